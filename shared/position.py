"""Event-store positions as the API shows them: opaque strings.

Clients get a position from a command and hand it back to a query; they must not
read anything into it, so its encoding can change (it is versioned by its prefix).
"""

from __future__ import annotations

import re

_PATTERN = re.compile(r"^p1\.([0-9]{1,19})$")


class BadPosition(ValueError):
    pass


def encode(position: int | None) -> str | None:
    return None if position is None else f"p1.{position}"


def decode(token: str) -> int:
    match = _PATTERN.match(token.strip())
    if not match:
        raise BadPosition("not a position this service issued")
    return int(match.group(1))
