"""The replay's load, split by task id over processes: each process loads the events of
its own range of tasks (`projector.load_by_task` with a `TaskRange`, into its own
`BulkRows` sink), so folding and encoding the rows, which is Python's work and takes one
core per process, runs on every core.

The replay's process loads the first range itself; each further range is loaded by a
`LoadProcess`, a child that connects on its own (3 connections), reads its tasks' events
in one read-only transaction and COPYs their rows, and counts the events it has applied
in memory the parent reads (the progress report's). Each loader also folds what it read
for the verification (`verify.TaskFold.observe`) and hands back the per-user summaries.
Nobody writes the checkpoint but the replay, once every range is loaded.

`split` picks the ranges' bounds from a sample of the events, so each range holds about
as many events, whatever the task ids look like (random, time-ordered, or supplied by
a client).
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any
from uuid import UUID

import asyncpg

from projections.child import Child, ChildFailed
from projections.projector import BulkRows, HandlerFailed, TaskRange, load_by_task
from projections.verify import Summary, TaskFold
from shared.catalog import EVENTS_TABLE, Tables
from shared.errors import DATABASE_DOWN
from shared.position import Position

APPLICATION_NAME = "taskservice-replay-load"
# Below this many events a second process costs more (its start, a second sort) than
# it saves; at or above it, one loader per core up to `MAX_LOADERS` (`taskctl replay
# --loaders` chooses). On the 2-core VM, whole replays with one loader and with two,
# three of each: 50,000 events 1.10-1.15 s and 1.22-1.36 s; 100,000 events 1.93-2.02 s
# and 1.78-1.85 s; 200,000 events 4.30-4.45 s and 3.47-3.55 s.
PARALLEL_FROM = 100_000
MAX_LOADERS = 2
# The bounds come from about this many sampled events (`split`).
SAMPLE_ROWS = 20_000

# The range bounds: the task ids at even steps of the sampled events, in id order
# ($1: the sample's percentage of the table's pages, $2: the fractions).
SPLIT_POINTS = (
    "SELECT percentile_disc($2::float8[]) WITHIN GROUP (ORDER BY originator_id)"
    f" FROM {EVENTS_TABLE} TABLESAMPLE SYSTEM ($1)"
)


class LoadFailed(ChildFailed):
    """A loader process failed or died."""


def loaders_for(events: int, cpus: int | None = None) -> int:
    """How many processes load a store of `events` events (`PARALLEL_FROM`)."""
    if cpus is None:  # the cores this process may run on (Linux), else all of them
        usable = getattr(os, "sched_getaffinity", None)
        cpus = len(usable(0)) if usable is not None else os.cpu_count() or 1
    return 1 if events < PARALLEL_FROM else max(1, min(MAX_LOADERS, cpus))


async def split(conn: asyncpg.Connection, events: int, parts: int) -> list[TaskRange]:
    """`parts` ranges that cover every task id, each with about as many of the
    `events` events; fewer (one) when the sample finds no distinct bounds."""
    if parts <= 1 or events <= 0:
        return [(None, None)]
    percent = min(100.0, 100.0 * SAMPLE_ROWS / events)
    bounds = await conn.fetchval(SPLIT_POINTS, percent, [n / parts for n in range(1, parts)])
    cuts = sorted({b for b in bounds or () if b is not None})
    ends: list[UUID | None] = [None, *cuts, None]
    return list(zip(ends[:-1], ends[1:], strict=True))


class LoadProcess:
    """A child process that loads one `TaskRange` with `load_by_task`: started at once
    (its start overlaps the replay's setup), told what to load by `load`, which returns
    when it has (and raises what stopped it: `HandlerFailed` for an event it cannot
    apply, `ConnectionError` for a lost database, `LoadFailed` otherwise). `done` is
    how many events it has applied so far."""

    def __init__(self, dsn: str) -> None:
        self._done = multiprocessing.get_context("spawn").Value("q", 0, lock=False)
        self._child = Child(_load, _no_state, (dsn, self._done), name="replay-load",
                            what="second loader", failed=LoadFailed)

    @property
    def done(self) -> int:
        return int(self._done.value)

    async def load(self, t: Tables, upto: Position, tasks: TaskRange, batch_size: int
                   ) -> tuple[dict[str, Summary], list[str]]:
        """Load `tasks` up to `upto` into `t`; its verification fold's per-user
        summaries and problems (`TaskFold.observe`)."""
        kind, *what = await self._child.call("load", t, tuple(upto), tasks, batch_size)
        if kind == "handler":
            raise HandlerFailed.again(*what)
        if kind == "down":
            raise ConnectionError(f"the second loader lost the database: {what[0]}")
        return what[0], what[1]

    def peak_rss_mb(self) -> float | None:
        return self._child.peak_rss_mb()

    def close(self) -> None:
        self._child.close()


async def _load(dsn: str, done: Any, _: None, command: str, t: Tables,
                upto: tuple[int, int], tasks: TaskRange, batch_size: int) -> Any:
    """In the child: load `tasks`, folding them for the verification too; ("done",
    the fold's summaries, its problems), or (kind, ...) of what stopped it."""
    assert command == "load"
    settings = {"application_name": APPLICATION_NAME, "synchronous_commit": "off"}

    async def count(_: Position, events: int, __: float) -> None:
        done.value += events

    conns: list[asyncpg.Connection] = []
    try:
        for _ in range(3):  # the events' cursor, the keys' reads, the COPYs
            conns.append(await asyncpg.connect(dsn, server_settings=settings))
        read, keys, writer = conns
        fold = TaskFold()
        await load_by_task(read, keys, t, Position(*upto), BulkRows(writer),
                           batch_size=batch_size, after_batch=count, tasks=tasks,
                           checkpoint=False, observe=fold.observe)
        fold.finish()
    except HandlerFailed as e:
        return ("handler", e.position, str(e))
    except DATABASE_DOWN as e:
        return ("down", f"{type(e).__name__}: {e}")
    finally:
        for conn in conns:
            conn.terminate()
    return ("done", fold.expected(), fold.problems)


def _no_state() -> None:
    return None

