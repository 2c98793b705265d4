"""The activity feed's page cursor: opaque to clients, checked when it comes back.

A cursor is the (occurred_at, position) of a page's last row, sealed like positions
(`shared.position.Seal`, its own purpose and prefix): a forged or altered one is a 422,
and it does not show the history row's global position."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

from query_api.queries import FeedCursor
from shared.position import BadToken, PositionCodec, Seal

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PAIR = struct.Struct(">qQ")  # microseconds since the epoch, the row's position
PREFIX = "c2."
PURPOSE = "taskservice feed cursor v2"


class BadCursor(ValueError):
    pass


class CursorCodec:
    def __init__(self, positions: PositionCodec) -> None:
        self._seal = Seal(positions.key, PURPOSE, PREFIX)

    def encode(self, cursor: FeedCursor) -> str:
        micros = (cursor.occurred_at - _EPOCH) // timedelta(microseconds=1)
        return self._seal.seal(_PAIR.pack(micros, cursor.position))

    def decode(self, token: str) -> FeedCursor:
        try:
            micros, position = _PAIR.unpack(self._seal.open(token))
            occurred_at = _EPOCH + timedelta(microseconds=micros)
        except (BadToken, struct.error, OverflowError):
            raise BadCursor("not a cursor this service issued") from None
        if position > 2**63 - 1:
            raise BadCursor("not a cursor this service issued")
        return FeedCursor(occurred_at, position)
