"""`python -m bench.replay_stages DATABASE_URL [--events 200000] [--repeats 5] [--json]`:
the replay load's Python stages, each timed alone on one core.

It reads the first `--events` events of the store in the load's order (task by task,
`projector.SELECT_EVENTS_BY_TASK`) into memory once, in pages of the replay's size, then
times each stage over all of them, `--repeats` times: decoding the stored rows
(`projector._decode`), opening their sealed fields (`open_events`; the keys from
DATA_MASTER_KEY or the development key, as the replay's), the verification fold
(`verify.TaskFold.observe`), the handlers (`apply_events` into a sink that keeps the rows
instead of writing them), and COPYing those rows into temporary tables shaped as the read
tables (the client's encoding and the server's ingest, one after the other). Prints each
stage's median, as seconds per 1,000,000 events. Nothing is written to the store's tables.
(README, "Replay", and bench/README.md say what the figures mean for the replay's speed.)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import asyncpg

from projections import task_list
from projections.projector import (
    SELECT_EVENTS_BY_TASK,
    BulkRows,
    _decode,
    apply_events,
    open_events,
)
from projections.replay import BATCH_SIZE  # the replay's pages, not the live projector's
from projections.verify import TaskFold
from shared.catalog import LIVE, Tables
from shared.position import Position

STAGES = ("decode", "open", "fold", "handlers", "copy")
# Every event of the store: the load's read up to the highest position.
UPTO = Position((1 << 63) - 1, (1 << 63) - 1)


class KeptRows(BulkRows):
    """The bulk sink, keeping each page's rows and finished tasks instead of COPYing them."""

    def __init__(self) -> None:
        super().__init__(None)  # type: ignore[arg-type]  # no connection: nothing is written
        self.pages: list[tuple[tuple[Any, ...], list[task_list.TaskState]]] = []

    async def write(self, conn: asyncpg.Connection, t: Tables, rows: tuple[Any, ...]) -> None:
        self.pages.append((rows, self.complete()))


async def measure(url: str, events: int, repeats: int) -> dict[str, Any]:
    """{"events": how many were read, "seconds_per_million": {stage: median}, "runs":
    {stage: [seconds of each repeat]}}."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(readonly=True):
            cursor = await conn.cursor(SELECT_EVENTS_BY_TASK, str(UPTO.tx_id),
                                       UPTO.notification_id, None, None)
            rows = await cursor.fetch(events)
        pages = [rows[i:i + BATCH_SIZE] for i in range(0, len(rows), BATCH_SIZE)]
        decoded: list[list[Any]] = []  # decoded again before each timed opening
        opened = [await open_events(conn, _decode(p)) for p in pages]
        sink = KeptRows()
        for page in opened:
            await apply_events(conn, page, LIVE, sink)
        # Shaped as the load's tables: no index but the counts' key (their upsert's).
        await conn.execute(f"CREATE TEMP TABLE bench_history (LIKE {LIVE.history})")
        await conn.execute(f"CREATE TEMP TABLE bench_tasks (LIKE {LIVE.tasks})")
        await conn.execute(f"CREATE TEMP TABLE bench_stats (LIKE {LIVE.stats} INCLUDING ALL)")
        scratch = replace(LIVE, history="bench_history", tasks="bench_tasks",
                          stats="bench_stats")

        async def decode() -> None:
            for p in pages:
                _decode(p)

        async def opening() -> None:
            for page in decoded:  # opened in place: a fresh decode each time, not timed
                await open_events(conn, page)

        async def fold() -> None:
            f = TaskFold()
            for page in opened:
                f.observe(page)
            f.finish()

        async def handlers() -> None:
            kept = KeptRows()
            for page in opened:
                await apply_events(conn, page, LIVE, kept)

        async def copy() -> None:
            await conn.execute("TRUNCATE bench_history, bench_tasks, bench_stats")
            for page_rows, done in sink.pages:  # as `BulkRows` writes a page
                for batch in page_rows:
                    await batch.copy(conn, scratch)
                if done:
                    await task_list.copy_states(conn, scratch, done)

        stages: dict[str, Callable[[], Awaitable[None]]] = {
            "decode": decode, "open": opening, "fold": fold, "handlers": handlers, "copy": copy}
        runs: dict[str, list[float]] = {name: [] for name in STAGES}
        enabled = gc.isenabled()
        gc.disable()  # as the replay runs
        try:
            for _ in range(repeats):
                for name in STAGES:
                    if name == "open":
                        decoded[:] = [_decode(p) for p in pages]
                    started = time.perf_counter()
                    await stages[name]()
                    runs[name].append(time.perf_counter() - started)
        finally:
            if enabled:
                gc.enable()
    finally:
        await conn.close()
    scale = 1_000_000 / len(rows) if rows else 0.0
    return {"events": len(rows),
            "seconds_per_million": {k: round(statistics.median(v) * scale, 3)
                                    for k, v in runs.items()},
            "runs": {k: [round(s, 4) for s in v] for k, v in runs.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.replay_stages",
                                description=__doc__.split("\n")[1])
    p.add_argument("url", help="the store's database (postgresql://...)")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    result = asyncio.run(measure(a.url, a.events, a.repeats))
    if a.json:
        print(json.dumps(result))
        return
    print(f"{result['events']:,} events, median of {a.repeats}; seconds per 1,000,000 events:")
    for name, seconds in result["seconds_per_million"].items():
        print(f"  {name:<9} {seconds:6.2f}")



if __name__ == "__main__":
    main()
