"""`python -m bench.replay_worker DSN`: rebuild the read tables of DSN from its whole
event log with the live projector's own code path (the runner of
`projections.projector` with its live sink, until caught up), into fresh read tables;
prints one JSON line.

The harness runs it as a separate process pinned to the server CPUs, like the real
projector. When `taskctl replay` exists the harness can time that instead
(`python -m bench --replay-via taskctl`, see `bench/replay.py`).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import asyncpg

from shared.catalog import EVENTS_TABLE


async def catch_up(dsn: str, *, batch_size: int | None = None) -> object:
    """Apply every event committed so far to the live tables, as the live projector's
    runner does; the new checkpoint."""
    from projections.projector import (
        BATCH_SIZE,
        apply_until_caught_up,
        ensure_checkpoint,
    )

    conn = await asyncpg.connect(dsn)
    try:
        await ensure_checkpoint(conn)
        return await apply_until_caught_up(conn, batch_size=batch_size or BATCH_SIZE)
    finally:
        await conn.close()


async def rebuild(dsn: str) -> dict[str, float]:
    from bench.procs import db_init

    conn = await asyncpg.connect(dsn)
    try:
        events = await conn.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}")
    finally:
        await conn.close()
    started = time.perf_counter()
    db_init(dsn)  # fresh read tables: nothing has projected into this database
    position = await catch_up(dsn)
    seconds = time.perf_counter() - started
    return {"events": int(events), "position": position, "seconds": seconds,
            "events_per_s": events / seconds}


def main(argv: list[str]) -> None:
    # The default event loop, as `taskctl projector` (asyncio.run) uses.
    print(json.dumps(asyncio.run(rebuild(argv[0]))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
