"""Priority, tags and due date against a real PostgreSQL: accepted (and refused with a
422 naming the field) by POST, PUT and PATCH on both contracts; projected into the list,
the document, the history, the feed and the audit; filtered and sorted by the list
routes; old events and old read tables still work (`db init` migrates the table); a
replay equals the live projector."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
from fastapi.testclient import TestClient

from command_api.commands import Change, Create, Stamp
from projections.audit import verify
from projections.replay import replay
from query_api.app import create_app
from shared.catalog import IDEMPOTENCY_TABLE
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import bearer, new_user
from tests.support.projection import (
    Writer,
    catch_up,
    insert_raw_event,
    settings_for,
    snapshot,
)
from tests.support.query import assert_error

BASES = ("/api/tasks", "/api/{user}/tasks")
CREATE_FIELDS = "title, description, priority, tags, due_date"
CHANGE_FIELDS = "title, description, completed, priority, tags, due_date"


@pytest.fixture(scope="module")
def query_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def send(client: TestClient, method: str, path: str, user: str, body: Any = None,
         **headers: str) -> Any:
    return client.request(method, path, json=body, headers={**bearer(user), **headers})


def ok(response: Any, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


def fields(task: dict[str, Any]) -> tuple[Any, ...]:
    return task["priority"], task["tags"], task["due_date"]


# -- the command routes ------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES)
def test_create_replace_and_change_take_the_fields_on_both_contracts(
    command_client: TestClient, base: str
) -> None:
    user = new_user()
    tasks = base.format(user=user)
    created = ok(send(command_client, "POST", tasks, user, {
        "title": "Pay rent", "priority": "high", "tags": [" Home", "bills", "HOME"],
        "due_date": "2026-05-01T19:00:00+02:00"}), 201)
    assert fields(created) == ("high", ["home", "bills"], "2026-05-01T17:00:00+00:00")
    assert created["version"] == 1  # one TaskCreated carries them all
    one = f"{tasks}/{created['id']}"

    patched = ok(send(command_client, "PATCH", one, user, {"priority": "low"}))
    assert fields(patched) == ("low", ["home", "bills"], "2026-05-01T17:00:00+00:00")
    assert patched["version"] == 2
    patched = ok(send(command_client, "PATCH", one, user, {"due_date": None, "tags": ["x"]}))
    assert fields(patched) == ("low", ["x"], None) and patched["version"] == 4
    same = ok(send(command_client, "PATCH", one, user, {"priority": "low", "tags": ["X "]}))
    assert same["version"] == 4  # nothing changed, no event

    replaced = ok(send(command_client, "PUT", one, user, {
        "title": "Pay rent", "completed": True, "due_date": "2026-06-01"}))
    # PUT replaces every field; those left out take their defaults (completed: as given).
    assert fields(replaced) == ("medium", [], "2026-06-01T00:00:00+00:00")
    assert replaced["completed"] is True and replaced["version"] == 8

    plain = ok(send(command_client, "POST", tasks, user, {"title": "Plain"}), 201)
    assert fields(plain) == ("medium", [], None)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("body", "field", "says"), [
    ({"priority": "urgent"}, "priority", "'low', 'medium' or 'high'"),
    ({"priority": None}, "priority", ""),
    ({"tags": "work"}, "tags", "list of strings"),
    ({"tags": ["t"] * 11}, "tags", "at most 10 tags"),
    ({"tags": ["x" * 33]}, "tags", "at most 32 characters"),
    ({"tags": ["   "]}, "tags", "blank"),
    ({"tags": ["a\u0000"]}, "tags", "control characters"),
    ({"due_date": "next friday"}, "due_date", "ISO 8601"),
    ({"due_date": 1767225600}, "due_date", "must be a string"),
    ({"due_date": "2026-13-01"}, "due_date", "valid date"),
    ({"due_date": "9999-12-31T23:00:00-05:00"}, "due_date", "years 1 to 9999"),
])
def test_each_field_beyond_its_limits_is_a_422_naming_it(
    command_client: TestClient, base: str, body: dict[str, Any], field: str, says: str
) -> None:
    user = new_user()
    tasks = base.format(user=user)
    task = ok(send(command_client, "POST", tasks, user, {"title": "t"}), 201)
    one = f"{tasks}/{task['id']}"
    for method, path, full in (("POST", tasks, {"title": "t", **body}),
                               ("PUT", one, {"title": "t", **body}), ("PATCH", one, body)):
        if method != "PATCH" and body.get("priority", "") is None:
            continue  # a null priority is tested on PATCH; POST/PUT say the same
        error = assert_error(send(command_client, method, path, user, full), 422,
                             "VALIDATION_ERROR")
        assert list(error["details"]) == [field], (method, error)
        assert says in error["details"][field], (method, error)
    assert ok(send(command_client, "PATCH", one, user, {}))["version"] == 1  # still as created


@pytest.mark.parametrize("base", BASES)
def test_an_unknown_body_field_is_a_422_that_lists_the_accepted_fields(
    command_client: TestClient, base: str
) -> None:
    user = new_user()
    tasks = base.format(user=user)
    error = assert_error(send(command_client, "POST", tasks, user, {
        "title": "t", "recurrence_pattern": "daily"}), 422, "VALIDATION_ERROR")
    assert error["details"] == {
        "recurrence_pattern": f"Unknown field; accepted: {CREATE_FIELDS}"}
    task = ok(send(command_client, "POST", tasks, user, {"title": "t"}), 201)
    error = assert_error(send(command_client, "PATCH", f"{tasks}/{task['id']}", user, {
        "priority": "low", "color": "red"}), 422, "VALIDATION_ERROR")
    assert error["details"] == {"color": f"Unknown field; accepted: {CHANGE_FIELDS}"}
    error = assert_error(send(command_client, "PATCH", f"{tasks}/{task['id']}/complete", user, {
        "completed": True, "done": True}), 422, "VALIDATION_ERROR")
    assert error["details"] == {"done": "Unknown field; accepted: completed"}


def _fingerprint(method: str, path: str, body: Any) -> str:
    canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def test_a_create_without_the_fields_signs_its_idempotency_key_as_before(
    command_client: TestClient, database_url: str
) -> None:
    """Keys stored before the fields existed must still match their retries: a body
    without them (or with them at their defaults) signs as it always did."""
    user = new_user()
    first = send(command_client, "POST", "/api/tasks", user, {"title": "Keyed"},
                 **{"Idempotency-Key": "k-plain"})
    assert first.status_code == 201, first.text
    with psycopg.connect(database_url) as conn:
        stored = conn.execute(
            f"SELECT fingerprint FROM {IDEMPOTENCY_TABLE} WHERE user_id = %s AND key = %s",
            (user, "k-plain")).fetchone()
    assert stored == (_fingerprint("POST", "/api/tasks", {"title": "Keyed", "description": None}),)
    again = send(command_client, "POST", "/api/tasks", user, {
        "title": "Keyed", "priority": "medium", "tags": [], "due_date": None},
        **{"Idempotency-Key": "k-plain"})
    assert again.status_code == 201 and again.json()["data"] == first.json()["data"]
    other = send(command_client, "POST", "/api/tasks", user, {"title": "Keyed", "tags": ["a"]},
                 **{"Idempotency-Key": "k-plain"})
    assert_error(other, 422, "VALIDATION_ERROR")
    # With a due date, the key signs its normalised form: the same instant matches.
    at = send(command_client, "POST", "/api/tasks", user,
              {"title": "Due", "due_date": "2026-05-01"}, **{"Idempotency-Key": "k-due"})
    same = send(command_client, "POST", "/api/tasks", user, {
        "title": "Due", "due_date": "2026-05-01T02:00:00+02:00"}, **{"Idempotency-Key": "k-due"})
    assert same.status_code == 201 and same.json()["data"] == at.json()["data"]


# -- the read side -----------------------------------------------------------------------


def get(client: TestClient, path: str, user: str, **params: Any) -> Any:
    return client.get(path, params=params, headers=bearer(user))


async def test_the_read_side_shows_the_fields_their_history_and_their_events(
    command_client: TestClient, query_client: TestClient, database_url: str
) -> None:
    user = new_user()
    created = ok(send(command_client, "POST", "/api/tasks", user, {
        "title": "Renew passport", "tags": ["Admin"], "due_date": "2026-07-01T09:00:00Z",
        "priority": "high"}), 201)
    one = f"/api/tasks/{created['id']}"
    ok(send(command_client, "PATCH", one, user, {"priority": "low"}))
    ok(send(command_client, "PATCH", one, user, {"tags": ["admin", "travel"]}))
    last = ok(send(command_client, "PATCH", one, user, {"due_date": None}))
    await catch_up(database_url)

    assert ok(get(query_client, one, user)) == last  # the command's view, byte for byte
    assert ok(get(query_client, f"/api/{user}/tasks", user)) == [last]
    history = ok(get(query_client, f"{one}/history", user))
    assert [(h["type"], h["changes"]) for h in history] == [
        ("TaskCreated", {
            "title": {"from": None, "to": "Renew passport"},
            "description": {"from": None, "to": None},
            "completed": {"from": None, "to": False},
            "priority": {"from": None, "to": "high"},
            "tags": {"from": None, "to": ["admin"]},
            "due_date": {"from": None, "to": "2026-07-01T09:00:00+00:00"}}),
        ("TaskPriorityChanged", {"priority": {"from": "high", "to": "low"}}),
        ("TaskTagsChanged", {"tags": {"from": ["admin"], "to": ["admin", "travel"]}}),
        ("TaskDueDateChanged", {"due_date": {"from": "2026-07-01T09:00:00+00:00", "to": None}}),
    ]
    for topic in ("TaskPriorityChanged", "TaskTagsChanged", "TaskDueDateChanged"):
        feed = ok(get(query_client, "/api/history", user, type=topic))
        assert [h["type"] for h in feed] == [topic]
    stats = ok(get(query_client, "/api/stats", user))
    assert stats == {"total": 1, "completed": 0, "pending": 1}


@pytest.fixture(scope="module")
async def sorted_world(command_client: TestClient, database_url: str) -> dict[str, Any]:
    """One user's tasks with every mix of priority, tags and due date (ties included)."""
    user = new_user()
    specs = {
        "a": {"priority": "high", "tags": ["work", "urgent"], "due_date": "2026-03-01T10:00:00Z"},
        "b": {"priority": "low", "tags": ["work"], "due_date": "2026-03-01T10:00:00Z"},
        "c": {"priority": "medium", "tags": ["home"], "due_date": "2026-02-01"},
        "d": {"priority": "high", "tags": [], "due_date": None},
        "e": {"priority": "medium", "tags": ["Work", "home"], "due_date": None},
        "f": {"priority": "low", "tags": ["urgent"], "due_date": "2026-04-15T23:59:59.5-01:00"},
        "g": {"priority": "high", "tags": ["work"], "due_date": "2026-03-01T10:00:00Z"},
    }
    tasks = {}
    for name, spec in specs.items():
        tasks[name] = ok(send(command_client, "POST", "/api/tasks", user,
                              {"title": f"task {name}", **spec}), 201)
    await catch_up(database_url)
    return {"user": user, "tasks": tasks}


def names(world: dict[str, Any], listed: list[dict[str, Any]]) -> list[str]:
    by_id = {t["id"]: n for n, t in world["tasks"].items()}
    return [by_id[t["id"]] for t in listed]


def newest_first(world: dict[str, Any], *chosen: str) -> list[str]:
    """The tie-breaker of every sort: newest first (created_at, then task id)."""
    return sorted(chosen, key=lambda n: (world["tasks"][n]["created_at"], world["tasks"][n]["id"]),
                  reverse=True)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("params", "expected"), [
    ({"priority": "high"}, {"a", "d", "g"}),
    ({"priority": "low"}, {"b", "f"}),
    ({"tag": "work"}, {"a", "b", "e", "g"}),
    ({"tag": [" WORK", "urgent"]}, {"a"}),  # every tag given, compared as stored
    ({"tag": ["work", "home"]}, {"e"}),
    ({"tag": ["nothing"]}, set()),
    ({"due_before": "2026-03-01T10:00:00Z"}, {"c"}),  # exclusive
    ({"due_after": "2026-03-01T10:00:00Z"}, {"a", "b", "f", "g"}),  # inclusive
    ({"due_after": "2026-03-01T11:00:00+01:00", "due_before": "2026-03-02"}, {"a", "b", "g"}),
    ({"due_after": "2026-04-16T00:59:59.5Z"}, {"f"}),  # offsets converted to UTC
    ({"due_after": "2026-04-16T00:59:59.500001Z"}, set()),
    ({"due_before": "9999-12-31"}, {"a", "b", "c", "f", "g"}),  # no due date: never in range
    ({"priority": "high", "tag": "work", "due_before": "2026-04-01"}, {"a", "g"}),
    ({"priority": "medium", "status": "completed"}, set()),
])
def test_list_filters_by_priority_tags_and_due_date(
    query_client: TestClient, sorted_world: dict[str, Any], base: str,
    params: dict[str, Any], expected: set[str],
) -> None:
    user = sorted_world["user"]
    response = get(query_client, base.format(user=user), user, **params)
    listed = ok(response)
    assert set(names(sorted_world, listed)) == expected
    assert response.json()["meta"]["total"] == len(expected)


@pytest.mark.parametrize("base", BASES)
def test_list_sorts_by_due_date_and_priority_with_nulls_last_and_a_unique_tie_breaker(
    query_client: TestClient, sorted_world: dict[str, Any], base: str
) -> None:
    w, user = sorted_world, sorted_world["user"]
    path = base.format(user=user)

    def order(sort: str, **params: Any) -> list[str]:
        return names(w, ok(get(query_client, path, user, sort=sort, **params)))

    tie = newest_first(w, "a", "b", "g")  # the same due date
    assert order("due_date") == ["c", *tie, "f", *newest_first(w, "d", "e")]
    assert order("-due_date") == ["f", *tie, "c", *newest_first(w, "d", "e")]
    high, medium, low = (newest_first(w, *p) for p in (("a", "d", "g"), ("c", "e"), ("b", "f")))
    assert order("priority") == [*low, *medium, *high]  # low < medium < high, not a-z
    assert order("-priority") == [*high, *medium, *low]
    for sort in ("due_date", "-due_date", "priority", "-priority"):
        pages = [order(sort, limit=2, offset=n) for n in range(0, 8, 2)]
        assert [n for page in pages for n in page] == order(sort), sort  # no overlap, no gap


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("params", "field"), [
    ({"priority": "urgent"}, "priority"),
    ({"priority": "HIGH"}, "priority"),
    ({"tag": "  "}, "tag"),
    ({"tag": "x" * 33}, "tag"),
    ({"tag": ["t"] * 11}, "tag"),
    ({"tag": "a\u0001b"}, "tag"),
    ({"due_before": "tomorrow"}, "due_before"),
    ({"due_before": "1700000000"}, "due_before"),
    ({"due_after": "2026-02-30"}, "due_after"),
    ({"due_after": "0001-01-01T00:00:00+01:00"}, "due_after"),
    ({"sort": "due"}, "sort"),
    ({"sort": "--priority"}, "sort"),
])
def test_a_bad_filter_value_is_a_422_naming_the_parameter(
    query_client: TestClient, sorted_world: dict[str, Any], base: str,
    params: dict[str, Any], field: str,
) -> None:
    user = sorted_world["user"]
    error = assert_error(get(query_client, base.format(user=user), user, **params), 422,
                         "VALIDATION_ERROR")
    assert field in error["details"], error


async def test_a_due_date_range_is_read_through_its_index(own_db: str) -> None:
    """As PostgreSQL plans the list statement over many users' rows: a due-date range is
    an index condition of the user's due-date index, not a filter over the user's rows;
    the other filters stay on the user's key (never a scan of every user's rows)."""
    import asyncpg

    from query_api import queries

    conn = await asyncpg.connect(own_db)
    try:
        await conn.execute(
            "INSERT INTO read_tasks (user_id, task_id, title, completed, created_at,"
            " updated_at, version, position, doc, priority, tags, due_date)"
            " SELECT 'u' || (i % 50), gen_random_uuid(), 't' || i, false, now(), now(), 1, i,"
            " '{}', (ARRAY['low', 'medium', 'high'])[1 + i % 3], ARRAY['t' || (i % 7)],"
            " CASE WHEN i % 4 = 0 THEN NULL ELSE now() + i * interval '1 hour' END"
            " FROM generate_series(1, 20000) i")
        await conn.execute("ANALYZE read_tasks")

        async def plan(**kwargs: Any) -> str:
            query = queries.list_tasks("u7", **kwargs)
            return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {query.sql}", *query.args))

        soon = datetime.now(UTC)
        ranged = await plan(due_after=soon, due_before=soon + timedelta(days=2), limit=20)
        assert "read_tasks_user_due_idx" in ranged, ranged
        assert "Index Cond: ((user_id = 'u7'::text) AND (due_date >=" in ranged, ranged
        for kwargs in ({"priority": "high", "tags": ["t3"]}, {"sort": "-priority"},
                       {"sort": "due_date", "limit": 10}):
            chosen = await plan(**kwargs)
            assert "Seq Scan" not in chosen, (kwargs, chosen)
    finally:
        await conn.close()


# -- old events, old tables, replay, audit -----------------------------------------------


OLD_CREATED = (
    '{{"timestamp":{{"_type_":"datetime_iso","_data_":"2025-01-02T03:04:05.000006+00:00"}},'
    '"originator_topic":"Task","actor":"{user}","request_id":"old-1","owner":"{user}",'
    '"title":"From before","description":null}}'
)


async def test_events_stored_before_the_fields_fold_and_take_new_commands(
    own_db: str,
) -> None:
    user, task_id = new_user(), uuid.uuid4()
    insert_raw_event(own_db, task_id, 1, "TaskCreated", OLD_CREATED.format(user=user).encode())
    await catch_up(own_db)
    with psycopg.connect(own_db) as conn:
        row = conn.execute("SELECT priority, tags, due_date, doc FROM read_tasks"
                           " WHERE task_id = %s", (task_id,)).fetchone()
        changes = conn.execute("SELECT changes FROM read_task_history WHERE task_id = %s",
                               (task_id,)).fetchone()
    assert row is not None and row[:3] == ("medium", [], None)
    assert fields(orjson.loads(row[3])) == ("medium", [], None)
    assert changes is not None and set(changes[0]) == {"title", "description", "completed"}

    writer = Writer(own_db)
    try:
        writer.change(user, task_id, priority="high", tags=("a",))
        writer.change(user, task_id, due_date=datetime(2026, 1, 1, tzinfo=UTC),
                      set_due_date=True)
    finally:
        writer.close()
    await catch_up(own_db)
    with psycopg.connect(own_db) as conn:
        doc = conn.execute("SELECT doc FROM read_tasks WHERE task_id = %s", (task_id,)).fetchone()
    assert doc is not None
    assert fields(orjson.loads(doc[0])) == ("high", ["a"], "2026-01-01T00:00:00+00:00")
    assert orjson.loads(doc[0])["version"] == 4
    report = await verify(own_db)
    assert report.ok, report.lines()
    live = snapshot(own_db)
    await replay(own_db)
    assert snapshot(own_db) == live


def write_every_field(url: str) -> list[str]:
    writer = Writer(url)
    users = [new_user() for _ in range(3)]
    due = datetime(2026, 5, 1, 17, tzinfo=UTC)
    try:
        writer.bulk(users=2, tasks_per_user=6)
        for n, user in enumerate(users):
            stamp = Stamp(user, f"req-{n}")
            a = writer.commands.run(Create(f"alpha {n}", None, "high", ("x", "y"), due), stamp)
            b = writer.commands.run(Create(f"beta {n}"), stamp)
            assert a.task is not None and b.task is not None
            writer.commands.run(Change(a.task.id, priority="low", tags=("y",)), stamp)
            writer.commands.run(Change(a.task.id, due_date=None, set_due_date=True), stamp)
            writer.commands.run(Change(b.task.id, tags=("z",), due_date=due, set_due_date=True),
                                stamp)
            writer.commands.run(Change(b.task.id, priority="high", completed=True), stamp)
            if n == 2:
                writer.delete(user, a.task.id)
    finally:
        writer.close()
    return users


async def test_a_replay_equals_the_live_projector_with_the_fields(own_db: str) -> None:
    write_every_field(own_db)
    await catch_up(own_db)
    live = snapshot(own_db)
    assert {r[-3] for r in live["tasks"]} == {"high", "low", "medium"}  # priority column
    assert any(r[-1] is not None for r in live["tasks"])  # a due date

    await replay(own_db, batch_size=7)

    assert snapshot(own_db) == live
    report = await verify(own_db)
    assert report.ok, report.lines()


async def test_db_init_adds_the_fields_to_a_read_table_made_before_them(own_db: str) -> None:
    writer = Writer(own_db)  # tasks as the service wrote them before the fields
    try:
        writer.bulk(users=3, tasks_per_user=8)
    finally:
        writer.close()
    await catch_up(own_db)
    with psycopg.connect(own_db) as conn:  # the table and its documents as they were
        conn.execute(f"UPDATE read_tasks SET doc = ({_DOC_WITHOUT_FIELDS})")
        conn.execute("DROP INDEX read_tasks_user_due_idx")
        conn.execute("ALTER TABLE read_tasks DROP COLUMN priority, DROP COLUMN tags,"
                     " DROP COLUMN due_date")
        old_docs = dict(conn.execute("SELECT task_id, doc FROM read_tasks").fetchall())
    assert old_docs and all('"priority"' not in d for d in old_docs.values())

    init_database(settings_for(own_db))

    with psycopg.connect(own_db) as conn:
        rows = conn.execute("SELECT task_id, priority, tags, due_date, doc FROM read_tasks"
                            ).fetchall()
        columns = [r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'read_tasks'"
            " ORDER BY ordinal_position").fetchall()]
        indexes = {r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'read_tasks'").fetchall()}
        xmin = conn.execute("SELECT xmin::text FROM read_tasks ORDER BY task_id").fetchall()
    assert columns[-4:] == ["doc", "priority", "tags", "due_date"]  # as a new table has them
    assert "read_tasks_user_due_idx" in indexes
    for task_id, priority, tags, due_date, doc in rows:
        assert (priority, tags, due_date) == ("medium", [], None)
        shown = orjson.loads(doc)
        assert fields(shown) == ("medium", [], None)
        assert {k: v for k, v in shown.items() if k not in ("priority", "tags", "due_date")} \
            == orjson.loads(old_docs[task_id])
        assert list(shown)[5:8] == ["priority", "tags", "due_date"]

    init_database(settings_for(own_db))  # again: nothing to add, no row rewritten
    with psycopg.connect(own_db) as conn:
        assert conn.execute("SELECT xmin::text FROM read_tasks ORDER BY task_id").fetchall() == xmin

    # The projector goes on writing the new columns; a replay then equals it.
    write_every_field(own_db)
    await catch_up(own_db)
    live = snapshot(own_db)
    await replay(own_db)
    assert snapshot(own_db) == live


# The document as the projector wrote it before the fields (old rows held this form).
_DOC_WITHOUT_FIELDS = (
    "SELECT '{' || string_agg(to_json(k)::text || ':' || v::text, ',' ORDER BY n) || '}'"
    " FROM (SELECT n, k, v FROM jsonb_each(doc::jsonb) WITH ORDINALITY AS e(k, v, n)) x"
    " WHERE k NOT IN ('priority', 'tags', 'due_date')"
)


def taskctl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskctl.cli", *args], env={"DATABASE_URL": url, "PATH": ""},
        capture_output=True, text=True, timeout=60, check=False,
    )


async def test_the_audit_lists_and_filters_the_new_events(own_db: str) -> None:
    users = write_every_field(own_db)
    out = taskctl(own_db, "audit", "--user", users[0], "--json", "--type", "TaskCreated",
                  "--type", "TaskPriorityChanged", "--type", "TaskTagsChanged",
                  "--type", "TaskDueDateChanged")
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(e["type"], e["data"]) for e in events] == [
        ("TaskCreated", {"title": "alpha 0", "description": None, "priority": "high",
                         "tags": ["x", "y"], "due_date": "2026-05-01T17:00:00+00:00"}),
        ("TaskCreated", {"title": "beta 0", "description": None, "priority": "medium",
                         "tags": [], "due_date": None}),
        ("TaskPriorityChanged", {"priority": "low"}),
        ("TaskTagsChanged", {"tags": ["y"]}),
        ("TaskDueDateChanged", {"due_date": None}),
        ("TaskTagsChanged", {"tags": ["z"]}),
        ("TaskDueDateChanged", {"due_date": "2026-05-01T17:00:00+00:00"}),
        ("TaskPriorityChanged", {"priority": "high"}),
    ]
    table = taskctl(own_db, "audit", "--user", users[0], "--type", "TaskDueDateChanged")
    assert table.returncode == 0 and "(2 events)" in table.stdout, table.stdout + table.stderr
    wrong = taskctl(own_db, "audit", "--type", "TaskPriority")
    assert wrong.returncode != 0 and "TaskPriorityChanged" in wrong.stderr
    await catch_up(own_db)
    checked = taskctl(own_db, "audit", "--verify")
    assert checked.returncode == 0, checked.stdout + checked.stderr
