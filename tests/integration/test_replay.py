"""`taskctl replay` against a real PostgreSQL: the rebuild equals the live projector,
verification refuses a corrupted rebuild, writes and reads go on during a replay, and
`projections status` tells where things stand."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import subprocess
import sys
import threading

import asyncpg
import psycopg
import pytest

from projections.projector import TRY_LOCK, run
from projections.replay import ReplayBusy, VerificationFailed, replay
from projections.verify import FoldProcessFailed
from shared.catalog import LIVE
from tests.support import new_user
from tests.support.projection import (
    Writer,
    before_verify,
    catch_up,
    every_event_type,
    snapshot,
)


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()}


def run_taskctl(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskctl.cli", *args], env={"DATABASE_URL": url, "PATH": ""},
        capture_output=True, text=True, timeout=timeout, check=False,
    )


async def test_replay_equals_the_live_projector_and_switches_to_a_new_version(own_db: str) -> None:
    writer = Writer(own_db)
    try:
        every_event_type(writer)
    finally:
        writer.close()
    await catch_up(own_db)
    live = snapshot(own_db)
    assert len(live["history"]) > 100 and live["stats"] and live["tasks"]
    keys_and_indexes = definitions(own_db)

    first = await replay(own_db, batch_size=37)  # odd pages: batches split tasks
    second = await replay(own_db)

    assert snapshot(own_db) == live
    assert (first.version, second.version) == (1, 2)
    assert first.events == len(live["history"]) and first.switched
    assert first.rows == {"read_tasks": len(live["tasks"]),
                          "read_task_history": len(live["history"]),
                          "read_user_stats": len(live["stats"])}
    left = {t for t in tables(own_db) if t.startswith("rebuild_") or "_old_" in t}
    assert left == set()
    with psycopg.connect(own_db) as conn:
        indexes = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'read_tasks'").fetchall()}
        served = conn.execute(
            "SELECT version FROM projection_versions WHERE projection = 'task_views'").fetchone()
    assert indexes == {"read_tasks_pkey", "read_tasks_user_created_idx",
                       "read_tasks_user_updated_idx", "read_tasks_user_title_idx",
                       "read_tasks_task_idx", "read_tasks_user_due_idx"}
    assert served == (2,)
    # The load goes without primary keys and indexes; the switched-to tables have them
    # all back, under the live names, as `db init` makes them.
    assert definitions(own_db) == keys_and_indexes


def definitions(url: str) -> dict[str, set[tuple[str, str]]]:
    """Each read table's constraints and indexes, by name and definition."""
    with psycopg.connect(url) as conn:
        return {table: {
            *((r[0], r[1]) for r in conn.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = %s::regclass", (table,)).fetchall()),
            *((r[0], r[1]) for r in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s",
                (table,)).fetchall()),
        } for table in (LIVE.tasks, LIVE.history, LIVE.stats)}


async def test_a_failed_verification_fold_process_fails_the_replay_and_the_next_run_works(
    own_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fold runs in a child process: if it dies, the replay fails (no switch, the
    live tables untouched) instead of hanging or passing unverified."""
    writer = Writer(own_db)
    try:
        every_event_type(writer)
    finally:
        writer.close()
    await catch_up(own_db)
    live = snapshot(own_db)

    async def kill_the_fold(conn: asyncpg.Connection, t: object) -> None:
        children = multiprocessing.active_children()
        assert len(children) == 1, children
        children[0].kill()
        children[0].join(5)

    before_verify(monkeypatch, kill_the_fold)
    with pytest.raises(FoldProcessFailed, match="died"):
        await replay(own_db)
    assert snapshot(own_db) == live
    assert multiprocessing.active_children() == []
    with psycopg.connect(own_db) as conn:
        assert conn.execute("SELECT count(*) FROM projection_versions").fetchone() == (0,)
    result = await replay(own_db)
    assert result.version == 1 and snapshot(own_db) == live
    assert multiprocessing.active_children() == []


async def test_verification_refuses_a_corrupted_rebuild_and_keeps_the_live_tables(
    own_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = Writer(own_db)
    try:
        users = every_event_type(writer)
    finally:
        writer.close()
    await catch_up(own_db)
    live = snapshot(own_db)
    victim = users[1]

    async def corrupt(conn: asyncpg.Connection, t: object) -> None:
        await conn.execute(
            f"UPDATE {t.tasks} SET title = 'tampered' WHERE user_id = $1",  # type: ignore[attr-defined]
            victim,
        )

    before_verify(monkeypatch, corrupt)
    with pytest.raises(VerificationFailed) as failed:
        await replay(own_db)

    assert list(failed.value.differing) == [victim]
    assert "tasks rows" in failed.value.differing[victim][0]
    assert snapshot(own_db) == live
    with psycopg.connect(own_db) as conn:
        assert conn.execute("SELECT count(*) FROM projection_versions").fetchone() == (0,)
    # The next run cleans up what the failed one left and succeeds.
    result = await replay(own_db)
    assert result.version == 1 and snapshot(own_db) == live


async def test_replay_while_writes_continue_loses_none_and_reads_never_see_a_partial_table(
    own_db: str,
) -> None:
    writer = Writer(own_db)
    writer.bulk(users=4, tasks_per_user=150)
    steady = new_user()
    for n in range(20):
        writer.create(steady, f"steady {n}")
    stop = asyncio.Event()
    projector = asyncio.ensure_future(run(own_db, poll_interval=0.05, stop=stop))

    writing = threading.Event()
    writing.set()
    written: list[str] = []
    busy = new_user()

    def write() -> None:
        n = 0
        while writing.is_set():
            task = writer.create(busy, f"during {n}")
            writer.change(busy, task, completed=n % 2 == 0)
            written.append(str(task))
            n += 1

    thread = threading.Thread(target=write)
    thread.start()

    reads: list[int] = []
    errors: list[BaseException] = []
    reading = True

    async def read() -> None:
        conn = await asyncpg.connect(own_db)
        try:
            while reading:
                try:
                    async with conn.transaction(isolation="repeatable_read", readonly=True):
                        count = await conn.fetchval(
                            "SELECT count(*) FROM read_tasks WHERE user_id = $1", steady)
                        history = await conn.fetchval(
                            "SELECT count(*) FROM read_task_history WHERE user_id = $1", steady)
                    reads.append(count)
                    assert (count, history) == (20, 20), (count, history)
                except Exception as e:  # collected and asserted below
                    errors.append(e)
                await asyncio.sleep(0)
        finally:
            await conn.close()

    def steady_projected() -> bool:
        with psycopg.connect(own_db) as conn:
            return conn.execute("SELECT count(*) FROM read_tasks WHERE user_id = %s",
                                (steady,)).fetchone() == (20,)

    for _ in range(400):
        if steady_projected():
            break
        await asyncio.sleep(0.05)
    reader = asyncio.ensure_future(read())
    try:
        result = await replay(own_db, batch_size=200)
    finally:
        writing.clear()
        await asyncio.to_thread(thread.join, 30)
        reading = False
        await reader
    try:
        await asyncio.sleep(0.2)
        with psycopg.connect(own_db) as conn:
            expected = conn.execute("SELECT count(*) FROM tasks_events").fetchone()[0]

        def caught_up() -> bool:
            with psycopg.connect(own_db) as conn:
                return conn.execute(
                    "SELECT count(*) FROM read_task_history").fetchone()[0] == expected

        for _ in range(200):
            if caught_up():
                break
            await asyncio.sleep(0.05)
        assert caught_up()
    finally:
        stop.set()
        await asyncio.wait_for(projector, 10)
        writer.close()

    assert errors == []
    assert len(reads) > 10
    assert result.switched and result.version == 1
    assert len(written) > 5
    with psycopg.connect(own_db) as conn:
        rows = conn.execute("SELECT task_id::text FROM read_tasks WHERE user_id = %s",
                            (busy,)).fetchall()
    assert sorted(r[0] for r in rows) == sorted(written)
    # The switched-to tables are what a fresh projector makes of the whole store.
    live = snapshot(own_db)
    with psycopg.connect(own_db) as conn:
        conn.execute("DELETE FROM projection_versions")
    again = await replay(own_db)
    assert again.version == 1 and snapshot(own_db) == live


async def test_in_place_rebuilds_the_live_tables(own_db: str) -> None:
    writer = Writer(own_db)
    try:
        every_event_type(writer)
    finally:
        writer.close()
    await catch_up(own_db)
    live = snapshot(own_db)
    with psycopg.connect(own_db) as conn:
        conn.execute("UPDATE read_user_stats SET total = total + 5")  # drifted

    result = await replay(own_db, in_place=True, batch_size=100)

    assert result.in_place and result.version is None
    assert snapshot(own_db) == live


def test_cli_replay_prints_a_json_summary_and_status_reports_the_lag(own_db: str) -> None:
    writer = Writer(own_db)
    try:
        every_event_type(writer)
        asyncio.run(catch_up(own_db))
        writer.create(new_user(), "not projected yet")
        writer.create(new_user(), "nor this")
    finally:
        writer.close()

    status = run_taskctl(own_db, "projections", "status", "--json")
    assert status.returncode == 0, status.stderr
    before = json.loads(status.stdout)["projections"][0]
    assert before["lag_events"] == 2 and before["lag_seconds"] >= 0
    assert before["held_by_projector"] is False and before["serving_version"] == 0

    done = run_taskctl(own_db, "replay", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["projection"] == "task_views" and summary["version"] == 1
    assert summary["events"] == summary["rows"]["read_task_history"] > 100
    assert "events" in done.stderr  # the progress line

    async def hold_lock_and_ask() -> dict:
        lock = await asyncpg.connect(own_db)
        try:
            assert await lock.fetchval(TRY_LOCK, "taskservice.projector:task_views")
            out = await asyncio.to_thread(run_taskctl, own_db, "projections", "status", "--json")
            return json.loads(out.stdout)["projections"][0] | {"pid": lock.get_server_pid()}
        finally:
            await lock.close()

    after = asyncio.run(hold_lock_and_ask())
    assert after["lag_events"] == 0 and after["serving_version"] == 1
    assert after["held_by_projector"] is True and after["projector_pid"] == after["pid"]
    assert after["position"] == after["head"]
    text = run_taskctl(own_db, "projections", "status")
    assert "serving      version 1" in text.stdout


def test_cli_replay_rejects_an_unknown_projection(own_db: str) -> None:
    out = run_taskctl(own_db, "replay", "--projection", "nope")
    assert out.returncode == 2 and "unknown projection" in out.stderr
    assert LIVE.tasks in tables(own_db)


async def test_replay_keeps_the_grants_of_the_live_tables(own_db: str) -> None:
    # The query API may connect as a read-only role: after the switch it must still read.
    role = f"reader_{new_user().replace('-', '')[:12]}"
    with psycopg.connect(own_db, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} NOLOGIN")
        for table in (LIVE.tasks, LIVE.history, LIVE.stats):
            conn.execute(f"GRANT SELECT ON {table} TO {role}")
        conn.execute(f"GRANT UPDATE ON {LIVE.stats} TO {role} WITH GRANT OPTION")
    try:
        writer = Writer(own_db)
        try:
            writer.create(new_user(), "one task")
        finally:
            writer.close()
        result = await replay(own_db)
        assert result.switched
        with psycopg.connect(own_db) as conn:
            grants = {
                table: set(conn.execute(
                    "SELECT privilege_type, is_grantable FROM information_schema.role_table_grants"
                    " WHERE grantee = %s AND table_name = %s", (role, table)).fetchall())
                for table in (LIVE.tasks, LIVE.history, LIVE.stats)
            }
        assert grants == {
            LIVE.tasks: {("SELECT", "NO")},
            LIVE.history: {("SELECT", "NO")},
            LIVE.stats: {("SELECT", "NO"), ("UPDATE", "YES")},
        }
    finally:
        with psycopg.connect(own_db, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def hold_replay_lock(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(hashtextextended('taskservice.replay:task_views', 0))")
    return conn


async def test_a_replay_waits_for_one_still_holding_the_lock_then_says_who(own_db: str) -> None:
    holder = hold_replay_lock(own_db)
    try:
        pid = holder.execute("SELECT pg_backend_pid()").fetchone()[0]
        with pytest.raises(ReplayBusy, match=rf"running \(backend {pid}, .*\); waited 0.5 s"):
            await replay(own_db, lock_wait=0.5)
        # A holder that lets go within the wait (a killed replay's backend finishing its
        # statement): the next run goes ahead.
        threading.Timer(0.5, holder.close).start()
        result = await replay(own_db, lock_wait=10)
        assert result.switched
    finally:
        holder.close()


def test_the_load_tables_with_their_keys_and_indexes_are_the_db_init_tables(own_db: str) -> None:
    """The replay creates its tables without keys and indexes (`load_ddl`) and adds them
    after the load (`keys_and_indexes`): the result must be what `db init` makes."""
    from projections.manifest import keys_and_indexes, load_ddl, table_names
    from projections.replay import rebuild_tables

    target = rebuild_tables(LIVE, 99)

    def shape(conn: psycopg.Connection, names: list[str]) -> list[tuple[object, ...]]:
        out = []
        for n, name in enumerate(names):
            strip = lambda text: text.replace(name, f"<{n}>")  # noqa: E731
            out.extend(sorted(
                (n, strip(r[0]), strip(r[1])) for r in conn.execute(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", (name,))))
            out.extend(sorted((n, strip(r[0]), strip(r[1]), r[2]) for r in conn.execute(
                "SELECT conname, pg_get_constraintdef(oid), contype FROM pg_constraint"
                " WHERE conrelid = %s::regclass", (name,))))
            out.append((n, conn.execute(
                "SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (name,)).fetchone()))
            out.append((n, conn.execute(
                "SELECT array_agg((attname, format_type(atttypid, atttypmod), attnotnull)::text"
                " ORDER BY attnum) FROM pg_attribute WHERE attrelid = %s::regclass"
                " AND attnum > 0 AND NOT attisdropped", (name,)).fetchone()))
        return out

    with psycopg.connect(own_db) as conn:
        for statement in [*load_ddl(target), *keys_and_indexes(target)]:
            conn.execute(statement)
        assert shape(conn, table_names(target)) == shape(conn, table_names(LIVE))


async def test_the_switch_renames_a_tables_constraints_with_it(own_db: str) -> None:
    """`_rename` (the switch's): the indexes and the other constraints named after the
    table (a check here; PostgreSQL 18 also names NOT NULLs so) take the new name."""
    from projections.replay import _rename

    conn = await asyncpg.connect(own_db)
    try:
        await conn.execute(
            "CREATE TABLE rebuild_shape_1 (x int NOT NULL, y int,"
            " CONSTRAINT rebuild_shape_1_pkey PRIMARY KEY (x),"
            " CONSTRAINT rebuild_shape_1_y_check CHECK (y > 0))")
        await conn.execute("CREATE INDEX rebuild_shape_1_y_idx ON rebuild_shape_1 (y)")
        await _rename(conn, "rebuild_shape_1", "read_shape")
        names = {r[0] for r in await conn.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = 'read_shape'::regclass"
            " UNION SELECT indexname FROM pg_indexes WHERE tablename = 'read_shape'")}
    finally:
        await conn.close()
    assert {"read_shape_pkey", "read_shape_y_check", "read_shape_y_idx"} <= names
    assert not [n for n in names if n.startswith("rebuild_")]
