"""`taskctl keys rotate-master` and `taskctl users rotate-key`: the key rotations of
docs/privacy.md.

- **Master key.** Set DATA_MASTER_KEY to `NEW,OLD` (the first wraps, every one
  unwraps) on every process, then run `taskctl keys rotate-master`: in one
  transaction it unwraps every data key not wrapped by NEW and wraps it again with
  NEW. Then DATA_MASTER_KEY may be just `NEW`. Without DATA_MASTER_KEY (development),
  there is nothing to rotate to. The development key is accepted as an old one.
- **A user's data key.** `taskctl users rotate-key USER` adds a new key for the user:
  their next events are sealed with it (each process takes it up within
  `command_api.store.SEALING_KEY_TTL`); the old ones still open what they sealed, and
  an erasure deletes them all.
"""

from __future__ import annotations

import asyncio
import os
import sys

import asyncpg

from shared.datakeys import (
    DATA_KEYS_TABLE,
    DEV_MASTER_TABLE,
    INSERT_KEY,
    MasterKeyError,
    MasterKeys,
    new_data_key,
    parse_master_keys,
)

_TO_REWRAP = (
    f"SELECT key_id, user_id, master_id, wrapped FROM {DATA_KEYS_TABLE}"
    " WHERE master_id <> $1 ORDER BY key_id FOR UPDATE"
)
_REWRAP = f"UPDATE {DATA_KEYS_TABLE} SET master_id = $2, wrapped = $3 WHERE key_id = $1"
_DEV_KEY = f"SELECT key FROM {DEV_MASTER_TABLE} WHERE id = 1"


async def _master(conn: asyncpg.Connection, configured: str | None) -> MasterKeys:
    keys = parse_master_keys(configured) if configured else []
    dev = await conn.fetchval(_DEV_KEY) if await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", DEV_MASTER_TABLE) else None
    if dev is not None and bytes(dev) not in keys:
        keys.append(bytes(dev))  # an old one: unwraps, never wraps (unless alone)
    if not keys:
        raise MasterKeyError("DATA_MASTER_KEY is not set, and this database has no"
                             " development key: run `taskctl db init`")
    return MasterKeys(tuple(keys))


async def rotate_master(dsn: str, configured: str | None) -> tuple[int, str]:
    """Wrap every data key with DATA_MASTER_KEY's first key: (how many, its id)."""
    if not configured:
        raise MasterKeyError("set DATA_MASTER_KEY to NEW,OLD first (docs/privacy.md,"
                             " 'Rotating the master key')")
    conn = await asyncpg.connect(dsn)
    try:
        master = await _master(conn, configured)
        async with conn.transaction():
            rows = await conn.fetch(_TO_REWRAP, master.current)
            for key_id, user_id, wrapped_by, wrapped in rows:
                raw = master.unwrap(user_id, key_id, wrapped_by, wrapped)
                now_by, now_wrapped = master.wrap(user_id, key_id, raw)
                await conn.execute(_REWRAP, key_id, now_by, now_wrapped)
        return len(rows), master.current
    finally:
        await conn.close()


async def rotate_user_key(dsn: str, configured: str | None, user: str) -> str:
    """A new data key for `user` (new events use it; old keys stay): its id."""
    conn = await asyncpg.connect(dsn)
    try:
        master = await _master(conn, configured)  # the configured one first: it wraps
        key, raw = new_data_key(user)
        wrapped_by, wrapped = master.wrap(user, key.key_id, raw)
        await conn.execute(INSERT_KEY, key.key_id, user, wrapped_by, wrapped)
        return str(key.key_id)
    finally:
        await conn.close()


def rotate_master_main(dsn: str) -> int:
    try:
        count, current = asyncio.run(rotate_master(dsn, os.environ.get("DATA_MASTER_KEY")))
    except MasterKeyError as e:
        print(f"taskctl keys rotate-master: {e}", file=sys.stderr)
        return 2
    print(f"{count} data key(s) wrapped again with master key {current}; every data key"
          f" is now wrapped by it")
    return 0


def rotate_user_key_main(dsn: str, user: str) -> int:
    try:
        key_id = asyncio.run(rotate_user_key(dsn, os.environ.get("DATA_MASTER_KEY"), user))
    except MasterKeyError as e:
        print(f"taskctl users rotate-key: {e}", file=sys.stderr)
        return 2
    print(f"new data key {key_id} for user {user!r}: their next events are sealed with it")
    return 0
