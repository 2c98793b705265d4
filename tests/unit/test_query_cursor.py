"""The query side's pure helpers: the feed cursor and the LIKE pattern."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import pytest

from query_api.cursor import BadCursor, CursorCodec
from query_api.queries import FeedCursor, like_pattern
from shared.position import Position, PositionCodec

CODEC = PositionCodec(os.urandom(32))
CURSORS = CursorCodec(CODEC)


@pytest.mark.parametrize(
    "cursor",
    [
        FeedCursor(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), 42),
        FeedCursor(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC), 1),
        FeedCursor(datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), 2**63 - 1),
    ],
)
def test_a_cursor_round_trips_exactly(cursor: FeedCursor):
    token = CURSORS.encode(cursor)
    assert token.isascii() and "=" not in token and token.startswith("c2.")
    assert CURSORS.decode(token) == cursor


@pytest.mark.parametrize(
    "token",
    ["", "garbage!", "YzEuMTIz", "Yy4xLjI", "é", "YzEuOTk5OTk5OTk5OTk5OTk5OTk5LjE", "=" * 8,
     "c2.", "c2." + "A" * 54,
     # sealed, but under another key; a position's token; a truncated cursor
     CursorCodec(PositionCodec(os.urandom(32))).encode(FeedCursor(datetime.now(UTC), 1)),
     CODEC.encode(Position(1, 2)),
     CURSORS.encode(FeedCursor(datetime.now(UTC), 1))[:-4]],
)
def test_rejects_a_cursor_it_did_not_issue(token: str):
    with pytest.raises(BadCursor):
        CURSORS.decode(token)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("milk", "%milk%"),
        ("100%", "%100\\%%"),
        ("a_b", "%a\\_b%"),
        ("back\\slash", "%back\\\\slash%"),
    ],
)
def test_like_pattern_takes_wildcards_literally(text: str, pattern: str):
    assert like_pattern(text) == pattern
