"""The replay's load split over processes (`projections.loader`) against a real
PostgreSQL: the ranges cover every task, the split rebuild equals the live projector,
and a second loader that fails or dies fails the replay without touching the live
tables."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import subprocess
import sys
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest

import projections.replay as replay_module
from projections.loader import PARALLEL_FROM, LoadFailed, loaders_for, split
from projections.manifest import READ_MODELS
from projections.projector import HandlerFailed
from projections.replay import replay
from shared.catalog import EVENTS_TABLE, LIVE
from tests.support.projection import (
    Writer,
    catch_up,
    every_event_type,
    insert_raw_event,
    snapshot,
)


def some_of_everything(url: str) -> None:
    """Many tasks of several users (so both ranges hold some of each user's), and every
    kind of change."""
    writer = Writer(url)
    try:
        every_event_type(writer, users=4, tasks_per_user=40)
    finally:
        writer.close()


def events_in(url: str, lo: uuid.UUID | None, hi: uuid.UUID | None) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {EVENTS_TABLE} WHERE (%(lo)s::uuid IS NULL OR"
            " originator_id >= %(lo)s) AND (%(hi)s::uuid IS NULL OR originator_id < %(hi)s)",
            {"lo": lo, "hi": hi}).fetchone()
    assert row is not None
    return int(row[0])


def test_a_store_too_small_for_a_second_process_gets_one_loader() -> None:
    assert loaders_for(PARALLEL_FROM - 1, cpus=8) == 1
    assert loaders_for(PARALLEL_FROM, cpus=8) == 2
    assert loaders_for(PARALLEL_FROM, cpus=1) == 1


async def test_the_ranges_cover_every_task_once_with_about_as_many_events_each(
    own_db: str,
) -> None:
    some_of_everything(own_db)
    conn = await asyncpg.connect(own_db)
    try:
        total = int(await conn.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}"))
        assert await split(conn, total, 1) == [(None, None)]
        ranges = await split(conn, total, 2)
    finally:
        await conn.close()
    assert len(ranges) == 2
    (lo, cut), (cut_again, hi) = ranges
    assert lo is None and hi is None and cut is not None and cut == cut_again
    first, second = events_in(own_db, None, cut), events_in(own_db, cut, None)
    assert first + second == total
    # The whole table is sampled at this size: the cut is the events' median task.
    assert abs(first - second) <= 0.2 * total


async def test_a_load_split_over_two_processes_equals_the_live_projector(own_db: str) -> None:
    some_of_everything(own_db)
    await catch_up(own_db)
    live = snapshot(own_db)

    result = await replay(own_db, batch_size=23, loaders=2)

    assert result.loaders == 2 and result.events == len(live["history"])
    assert snapshot(own_db) == live
    assert result.peak_rss_mb["load"] > 0
    assert multiprocessing.active_children() == []
    with psycopg.connect(own_db) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'rebuild_%'"
                            ).fetchone() == (0,)


async def test_an_event_the_second_loader_cannot_apply_fails_the_replay_by_its_position(
    own_db: str,
) -> None:
    some_of_everything(own_db)
    await catch_up(own_db)
    live = snapshot(own_db)
    last = uuid.UUID(int=(1 << 128) - 1)  # the highest task id: in the last range
    bad = insert_raw_event(own_db, last, 1, "TaskRenamedByMistake", b"{}")

    with pytest.raises(HandlerFailed, match=f"position={bad.notification_id} .*"
                                            "topic=TaskRenamedByMistake") as failure:
        await replay(own_db, loaders=2)

    assert failure.value.position == bad.notification_id
    assert snapshot(own_db) == live
    assert multiprocessing.active_children() == []


async def test_a_second_loader_that_dies_fails_the_replay_and_the_next_run_works(
    own_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    some_of_everything(own_db)
    await catch_up(own_db)
    live = snapshot(own_db)
    load = replay_module.load_by_task

    async def kill_the_other_loader_first(*args: Any, **kwargs: Any) -> None:
        others = [p for p in multiprocessing.active_children() if p.name == "replay-load"]
        assert len(others) == 1, others
        others[0].kill()
        others[0].join(5)
        await load(*args, **kwargs)

    monkeypatch.setattr(replay_module, "load_by_task", kill_the_other_loader_first)
    with pytest.raises(LoadFailed, match="second loader process died"):
        await replay(own_db, loaders=2)
    assert snapshot(own_db) == live
    assert multiprocessing.active_children() == []

    monkeypatch.setattr(replay_module, "load_by_task", load)
    result = await replay(own_db, loaders=2)
    assert result.version == 1 and snapshot(own_db) == live


async def test_the_index_builds_stop_at_the_first_that_fails_and_build_the_rest_otherwise(
    own_db: str,
) -> None:
    """`build_keys_and_indexes` hands its jobs to two sessions by their dependencies: a
    failed key build fails the whole, at once (no session left waiting); without one,
    every key, index and ANALYZE is there."""
    t = replay_module.rebuild_tables(LIVE, 77)
    conn = await asyncpg.connect(own_db)
    try:
        await replay_module._create_for_load(conn, t)
        row = ("u", 1, uuid.uuid4(), 1, "TaskCreated", "u", "r", "2026-01-01T00:00:00Z", "{}")
        insert = (f"INSERT INTO {t.history} VALUES ($1, $2, $3, $4, $5, $6, $7,"
                  " $8::text::timestamptz, $9::jsonb)")
        await conn.execute(insert, *row)
        await conn.execute(insert, *row)  # the same (user_id, position): no primary key
        with pytest.raises(asyncpg.UniqueViolationError):
            await asyncio.wait_for(replay_module.build_keys_and_indexes(own_db, t), 60)
        t = replay_module.rebuild_tables(LIVE, 78)  # (a replay never builds twice)
        await replay_module._create_for_load(conn, t)
        await conn.execute(insert.replace(replay_module.rebuild_tables(LIVE, 77).history,
                                          t.history), *row)
        await replay_module.build_keys_and_indexes(own_db, t)
        built = {r[0] for r in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE tablename = ANY($1::text[])",
            [t.tasks, t.history])}
        expected = {f"{t.tasks}_pkey", f"{t.history}_pkey",
                    *(s.split()[5] for m in READ_MODELS for s in m.indexes(t))}
        assert built == expected
        analyzed = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_user_tables WHERE relname = ANY($1::text[])"
            " AND last_analyze IS NOT NULL", [t.tasks, t.history, t.stats])
        assert analyzed == 3
    finally:
        await conn.close()


def test_cli_replay_takes_the_number_of_loaders(own_db: str) -> None:
    some_of_everything(own_db)
    asyncio.run(catch_up(own_db))
    live = snapshot(own_db)
    env = {"DATABASE_URL": own_db, "PATH": ""}

    def taskctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskctl.cli", "replay", *args], env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    done = taskctl("--loaders", "2", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["loaders"] == 2 and summary["switched"]
    assert snapshot(own_db) == live
    refused = taskctl("--loaders", "0")
    assert refused.returncode == 2 and "--loaders" in refused.stderr
