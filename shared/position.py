"""Positions in the event store's global order, and how the API shows them.

The order is (tx_id, notification_id): the id of the transaction that wrote an event,
then the event's own id. Readers take only events of transactions older than every
transaction still running (`tx_id < pg_snapshot_xmin(pg_current_snapshot())`), so an
event that commits late can never appear behind a position a reader has passed.

Clients get a position from a command and hand it back to a query; they must not read
anything into it, so its encoding can change (it is versioned by its prefix).
"""

from __future__ import annotations

import re
from typing import NamedTuple

_PATTERN = re.compile(r"^p2\.([0-9]{1,19})\.([0-9]{1,19})$")
_MAX = 2**63 - 1


class BadPosition(ValueError):
    pass


class Position(NamedTuple):
    """Compare with <, <=: tuples order by transaction id, then notification id."""

    tx_id: int
    notification_id: int

    def __str__(self) -> str:
        return f"{self.tx_id}.{self.notification_id}"


ZERO = Position(0, 0)


def encode(position: Position | None) -> str | None:
    return None if position is None else f"p2.{position.tx_id}.{position.notification_id}"


def decode(token: str) -> Position:
    match = _PATTERN.match(token.strip())
    if not match:
        raise BadPosition("not a position this service issued")
    tx_id, notification_id = int(match.group(1)), int(match.group(2))
    if tx_id > _MAX or notification_id > _MAX:
        raise BadPosition("not a position this service issued")
    return Position(tx_id, notification_id)
