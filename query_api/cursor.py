"""The activity feed's page cursor: opaque to clients, checked when it comes back."""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime, timedelta

from query_api.queries import FeedCursor

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PLAIN = re.compile(r"^c1\.(-?[0-9]{1,18})\.([0-9]{1,19})$")


class BadCursor(ValueError):
    pass


def encode_cursor(cursor: FeedCursor) -> str:
    micros = (cursor.occurred_at - _EPOCH) // timedelta(microseconds=1)
    plain = f"c1.{micros}.{cursor.position}"
    return base64.urlsafe_b64encode(plain.encode()).decode().rstrip("=")


def decode_cursor(token: str) -> FeedCursor:
    try:
        padded = token + "=" * (-len(token) % 4)
        plain = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
    except (UnicodeError, ValueError, binascii.Error):
        raise BadCursor("not a cursor this service issued") from None
    match = _PLAIN.match(plain)
    if not match:
        raise BadCursor("not a cursor this service issued")
    try:
        occurred_at = _EPOCH + timedelta(microseconds=int(match.group(1)))
    except OverflowError:
        raise BadCursor("not a cursor this service issued") from None
    position = int(match.group(2))
    if position > 2**63 - 1:
        raise BadCursor("not a cursor this service issued")
    return FeedCursor(occurred_at, position)
