"""`python -m bench.replay_worker DSN`: rebuild the read tables of DSN from its whole
event log with the projector's own code path (`projections.projector.catch_up`, the
one the live projector runs), into fresh read tables; prints one JSON line.

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


async def rebuild(dsn: str) -> dict[str, float]:
    from projections.manifest import create_read_tables_at  # noqa: PLC0415
    from projections.projector import catch_up  # noqa: PLC0415

    conn = await asyncpg.connect(dsn)
    try:
        events = await conn.fetchval("SELECT count(*) FROM tasks_events")
    finally:
        await conn.close()
    started = time.perf_counter()
    await create_read_tables_at(dsn)  # fresh: nothing has projected into this database
    position = await catch_up(dsn)
    seconds = time.perf_counter() - started
    return {"events": int(events), "position": position, "seconds": seconds,
            "events_per_s": events / seconds}


def main(argv: list[str]) -> None:
    # The default event loop, as `taskctl projector` (asyncio.run) uses.
    print(json.dumps(asyncio.run(rebuild(argv[0]))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
