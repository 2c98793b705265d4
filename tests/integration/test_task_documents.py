"""The read table's stored task documents (`read_tasks.doc`) against a real PostgreSQL:
the projector's Python rendering, the SQL rendering from the columns and the command
side's view agree byte for byte; tables made before `doc` get it filled by `db init`;
a replay refuses a rebuild whose documents do not match their rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from uuid import uuid4

import asyncpg
import orjson
import psycopg
import pytest

from command_api.routes import task_view
from projections.replay import VerificationFailed, replay
from projections.task_list import DOC_SQL, TaskState, document
from shared.documents import task_json
from shared.events import Task
from taskctl.dbinit import init_database
from tests.support import new_user
from tests.support.projection import (
    Writer,
    before_verify,
    catch_up,
    settings_for,
    snapshot,
)

# Strings JSON must escape, and ones it must not.
AWKWARD = "".join(chr(c) for c in range(1, 0x20)) + '"\\/é€😀\u2028\u2029\x7f<>&\'%_'
INSTANTS = [
    datetime(2026, 11, 27, 6, 3, 2, tzinfo=UTC),  # no fraction: isoformat prints none
    datetime(2026, 11, 27, 6, 3, 2, 120000, tzinfo=UTC),  # trailing zeros kept
    datetime(2026, 11, 27, 6, 3, 2, 1, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=2))),  # not UTC in Python
]


def states() -> list[TaskState]:
    out = []
    for n, at in enumerate(INSTANTS):
        out.append(TaskState(
            new_user(), uuid4(), f"title {n} {AWKWARD}", None if n % 2 else f"d {AWKWARD}",
            bool(n % 2), at, at + timedelta(microseconds=n * 10), n + 1, 2**40 + n,
        ))
    return out


async def test_python_and_sql_render_the_same_bytes_whatever_the_session_time_zone(
    own_db: str,
) -> None:
    conn = await asyncpg.connect(own_db)
    try:
        await conn.execute("CREATE TEMP TABLE t (LIKE read_tasks)")
        rows = states()
        await conn.copy_records_to_table(
            "t", records=[(*s, document(s)) for s in rows],
            columns=[*TaskState._fields, "doc"],
        )
        for zone in ("UTC", "Pacific/Chatham", "America/St_Johns"):
            await conn.execute(f"SET TIME ZONE '{zone}'")
            got = await conn.fetch(f"SELECT doc, {DOC_SQL} AS sql FROM t ORDER BY version")
            assert [r["sql"] for r in got] == [r["doc"] for r in got], zone
    finally:
        await conn.close()
    for s in rows:
        # The stored `doc` is the one rendering of a task, byte for byte.
        assert document(s) == task_json(s.task_id, s.user_id, s.title, s.description,
                                        s.completed, s.created_at, s.updated_at, s.version)
        parsed = orjson.loads(document(s))
        assert parsed["created_at"] == s.created_at.astimezone(UTC).isoformat()
        assert parsed["created_at"].endswith("+00:00")
        assert parsed["title"] == s.title and parsed["description"] == s.description


def test_a_document_is_the_command_sides_view_of_the_task() -> None:
    stamp = {"actor": "someone", "request_id": "r-1"}
    task = Task.create(owner=new_user(), title=f"Buy milk {AWKWARD}", description=None,
                       **stamp)
    task.change(title=f"Buy oat milk {AWKWARD}", completed=True, **stamp)
    state = TaskState(task.owner, task.id, task.title, task.description, task.completed,
                      task.created_on, task.modified_on, task.version, 7)
    assert document(state) == orjson.dumps(task_view(task)).decode()


async def test_db_init_fills_doc_in_a_table_made_before_it(own_db: str) -> None:
    writer = Writer(own_db)
    try:
        writer.bulk(users=2, tasks_per_user=5)
        user = new_user()
        task = writer.create(user, f"awkward {AWKWARD}", "described")
        writer.change(user, task, completed=True)
    finally:
        writer.close()
    await catch_up(own_db)
    live = snapshot(own_db)
    with psycopg.connect(own_db) as conn:
        # The table as it was (before doc, so before priority, tags and due_date too).
        conn.execute("ALTER TABLE read_tasks DROP COLUMN doc, DROP COLUMN priority,"
                     " DROP COLUMN tags, DROP COLUMN due_date")

    init_database(settings_for(own_db))

    assert snapshot(own_db) == live  # every doc as the projector writes it, nothing else
    with psycopg.connect(own_db) as conn:
        nullable = conn.execute(
            "SELECT is_nullable FROM information_schema.columns"
            " WHERE table_name = 'read_tasks' AND column_name = 'doc'").fetchone()
        assert nullable == ("NO",)
        xmin = conn.execute("SELECT xmin::text FROM read_tasks ORDER BY task_id").fetchall()
    init_database(settings_for(own_db))  # again: nothing to fill, no row rewritten
    with psycopg.connect(own_db) as conn:
        assert conn.execute("SELECT xmin::text FROM read_tasks ORDER BY task_id").fetchall() == xmin


async def test_replay_refuses_a_rebuild_whose_documents_do_not_match_their_rows(
    own_db: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    writer = Writer(own_db)
    try:
        user = new_user()
        task = writer.create(user, "Walk dog")
        writer.change(user, task, title="Walk the dog")
        other = new_user()
        writer.create(other, "Untouched")
    finally:
        writer.close()
    await catch_up(own_db)
    live = snapshot(own_db)

    async def stale_doc(conn: asyncpg.Connection, t: object) -> None:
        # The columns are right; only the served JSON still shows the old title.
        await conn.execute(
            f"UPDATE {t.tasks} SET doc = replace(doc, 'Walk the dog', 'Walk dog')"  # type: ignore[attr-defined]
            " WHERE user_id = $1", user,
        )

    before_verify(monkeypatch, stale_doc)
    with pytest.raises(VerificationFailed) as failed:
        await replay(own_db)

    assert list(failed.value.differing) == [user]
    assert "task documents" in " ".join(failed.value.differing[user])
    assert snapshot(own_db) == live
