"""Open sealed fields (`shared.datakeys`) in tests that read events as the library does."""

from __future__ import annotations

from typing import Any

import psycopg

from shared.datakeys import (
    DEV_MASTER_TABLE,
    SELECT_ALL_KEYS,
    KeyRing,
    MasterKeys,
    is_sealed,
)


def ring_of(url: str) -> KeyRing:
    """Every data key of the database at `url`, opened with its development master key."""
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT key FROM {DEV_MASTER_TABLE} WHERE id = 1").fetchone()
        assert row is not None, "no development master key: was the database initialised?"
        ring = KeyRing(MasterKeys((bytes(row[0]),)))
        for key_id, user_id, wrapped_by, wrapped in conn.execute(SELECT_ALL_KEYS).fetchall():
            ring.add_row(key_id, user_id, wrapped_by, bytes(wrapped))
    return ring


def opened(url: str, name: str, value: Any) -> Any:
    """`value` as the API shows it: a sealed field opened, anything else as it is."""
    if isinstance(value, (list, tuple)):
        return type(value)(opened(url, name, v) for v in value)
    return ring_of(url).open(name, value) if is_sealed(value) else value
