"""Row-level security under every read (issue 20, part 2): the query API's role sees the
rows of the statement's user and nothing else, even through a query that forgets its
user filter; with no user set, nothing at all; every query route still works as that
role; `taskctl db init` makes the policies (idempotently, taking back a hand-made one);
replay carries them to the tables it builds; the stream hub reads as the stream role.

Everything here connects as the roles `db init` makes (never the owner, whom no policy
binds), on a database of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import uuid4

import asyncpg
import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from projections.manifest import table_names
from projections.projector import run as run_projector
from projections.replay import replay
from query_api import queries
from query_api.app import create_app as query_app
from query_api.queries import Query
from query_api.reader import Reader
from query_api.watch import PositionWatch
from shared.catalog import EVENTS_TABLE, LIVE
from shared.position import ZERO
from shared.row_security import STREAM_ROLE, USER_POLICY, USER_SETTING
from taskctl.dbinit import PROJECTOR_ROLE, QUERY_ROLE, grants, init_database, row_policies
from tests.integration.test_roles import PRIVILEGES, held_on, settings_for
from tests.support import PostgresServer, as_role, bearer, new_user
from tests.support.live import serve
from tests.support.projection import Writer, catch_up
from tests.support.query import codec_for
from tests.support.sse import SseClient

TASKS = {"alice": 3, "bob": 2}


@pytest.fixture(scope="module")
def db(pg_server: PostgresServer) -> Iterator[dict[str, Any]]:
    """A database of its own, initialised like production: two users' tasks, one changed
    (so it has history), projected."""
    url = pg_server.create_database(prefix="taskservice_rls")
    init_database(settings_for(url), environ={})
    users = {name: new_user() for name in TASKS}
    tasks: dict[str, list[str]] = {}
    writer = Writer(url)
    try:
        for name, n in TASKS.items():
            ids = [writer.create(users[name], f"{name} {i}") for i in range(n)]
            writer.change(users[name], ids[0], completed=True)
            tasks[name] = [str(i) for i in ids]
    finally:
        writer.close()
    asyncio.run(catch_up(url))
    yield {"url": url, "users": users, "tasks": tasks}
    pg_server.drop_database(url)


@contextlib.asynccontextmanager
async def query_reader(url: str, user: str | None, size: int = 1) -> AsyncIterator[Reader]:
    """The query API's reader on a pool connected as the query role (`size` connections)."""
    pool = await asyncpg.create_pool(as_role(url, QUERY_ROLE), min_size=1, max_size=size)
    watch = PositionWatch(url)
    try:
        reader = Reader(pool, watch, 1.0, codec=codec_for(url))
        yield reader if user is None else reader.for_user(user)
    finally:
        await watch.close()
        await pool.close()


# Each read table without a user filter, through the reader's statement: the user
# column and how many rows.
UNFILTERED = [Query(f"SELECT user_id, count(*) AS n FROM {t} GROUP BY user_id", (),
                    order="user_id") for t in table_names(LIVE)]


async def owners(reader: Reader, query: Query) -> dict[str, int]:
    read = await reader.read_rows(None, query)
    return {user: n for user, n in read.result}


# -- a forgotten filter ----------------------------------------------------------------


async def test_an_unfiltered_query_through_the_readers_statement_sees_only_its_users_rows(
    db: dict[str, Any],
):
    alice, bob = db["users"]["alice"], db["users"]["bob"]
    for name, user in (("alice", alice), ("bob", bob)):
        async with query_reader(db["url"], user) as reader:
            tasks, history, stats = [await owners(reader, q) for q in UNFILTERED]
        # The user's rows, all of them (the owner sees both users' in the same tables).
        assert tasks == {user: TASKS[name]}, name
        assert history == {user: TASKS[name] + 1}, name  # each task's creation, one change
        assert stats == {user: 1}, name
    async with query_reader(db["url"], alice) as reader:
        read = await reader.read_row(
            None, Query(f"SELECT count(*) AS n FROM {LIVE.tasks} WHERE user_id = $1", (bob,)))
        assert read.result["n"] == 0  # asking for another user by name: nothing either


async def test_without_a_user_the_query_role_reads_no_rows(db: dict[str, Any]):
    async with query_reader(db["url"], None) as reader:
        for query in UNFILTERED:
            assert await owners(reader, query) == {}
        async with reader.connection() as conn:
            for table in table_names(LIVE):
                assert await conn.fetch(f"SELECT * FROM {table}") == []
            # A set user of another session's or an earlier statement's is not there either.
            assert not await conn.fetchval(f"SELECT current_setting('{USER_SETTING}', true)")


async def test_a_pooled_connection_never_carries_a_user_to_the_next_statement(
    db: dict[str, Any],
):
    alice = db["users"]["alice"]
    async with query_reader(db["url"], alice, size=1) as reader:  # one connection: the same
        assert await owners(reader, UNFILTERED[0]) == {alice: TASKS["alice"]}
        async with reader.connection() as conn:
            assert not await conn.fetchval(f"SELECT current_setting('{USER_SETTING}', true)")
            assert await conn.fetchval(f"SELECT count(*) FROM {LIVE.tasks}") == 0
        # Not even inside a transaction the next request might open.
        async with reader.connection() as conn, conn.transaction():
            assert await conn.fetchval(f"SELECT count(*) FROM {LIVE.tasks}") == 0


async def test_the_reads_scans_run_after_the_user_is_set(db: dict[str, Any]):
    """The plan: every scan of a read table lies on the inner side of the nested loop
    whose outer side is the CTE that sets the user, never before it."""
    alice = db["users"]["alice"]
    async with query_reader(db["url"], alice) as reader:
        captured: list[tuple[str, tuple[Any, ...]]] = []

        class Capture:
            async def fetch(self, sql: str, *args: Any) -> list[Any]:
                captured.append((sql, args))
                return []

            fetchrow = fetch

        class Pooled:
            async def __aenter__(self) -> Capture:
                return Capture()

            async def __aexit__(self, *_: object) -> None:
                return None

        capturing = reader.for_user(alice)
        capturing.connection = lambda: Pooled()  # type: ignore[method-assign]
        for query in (queries.list_tasks(alice, limit=10), queries.get_task(alice, uuid4()),
                      queries.task_history(alice, uuid4()), queries.activity_feed(alice),
                      queries.user_stats(alice), *UNFILTERED):
            await capturing._statement(query, "fetch", True)
        async with reader.connection() as conn:
            for sql, args in captured:
                (plan,) = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args))
                assert_read_tables_under_who(plan["Plan"], sql)


def assert_read_tables_under_who(plan: dict[str, Any], sql: str) -> None:
    """Find the nested loop with the `_who` CTE scan on its outer side: every scan of a
    read table is below its inner side, none anywhere else."""
    read_tables = set(table_names(LIVE))

    def scans(node: dict[str, Any]) -> list[str]:
        found = [node["Relation Name"]] if node.get("Relation Name") in read_tables else []
        for child in node.get("Plans", ()):
            found += scans(child)
        return found

    def outer_has_who(node: dict[str, Any]) -> bool:
        if node.get("Node Type") == "CTE Scan" and node.get("CTE Name") == "_who":
            return True
        return any(outer_has_who(c) for c in node.get("Plans", ())
                   if c.get("Parent Relationship") != "InitPlan")

    def check(node: dict[str, Any]) -> int:
        """How many read-table scans are under `node` and correctly placed."""
        children = node.get("Plans", ())
        if node.get("Node Type") == "Nested Loop":
            outer = [c for c in children if c.get("Parent Relationship") == "Outer"]
            inner = [c for c in children if c.get("Parent Relationship") == "Inner"]
            if outer and inner and outer_has_who(outer[0]):
                assert scans(outer[0]) == [], sql
                return len(scans(inner[0]))
        return sum(check(c) for c in children)

    total = len(scans(plan))
    assert total > 0, sql
    assert check(plan) == total, (sql, plan)


# -- every query route, as the query role -----------------------------------------------


def test_every_query_route_works_as_the_query_role(db: dict[str, Any]):
    alice, bob = db["users"]["alice"], db["users"]["bob"]
    first, bobs = db["tasks"]["alice"][0], db["tasks"]["bob"][0]
    settings = settings_for(as_role(db["url"], QUERY_ROLE))
    with TestClient(query_app(settings), raise_server_exceptions=False) as client:
        auth = bearer(alice)
        listed = client.get("/api/tasks", headers=auth)
        assert listed.status_code == 200, listed.text
        assert sorted(t["id"] for t in listed.json()["data"]) == sorted(db["tasks"]["alice"])
        assert listed.json()["meta"]["total"] == TASKS["alice"]
        assert client.get("/api/tasks?status=completed", headers=auth).json()["meta"]["total"] == 1
        page = client.get(f"/api/{alice}/tasks?q=alice&limit=2", headers=auth).json()
        assert (len(page["data"]), page["meta"]["total"]) == (2, TASKS["alice"])
        one = client.get(f"/api/tasks/{first}", headers=auth)
        assert one.status_code == 200 and one.json()["data"]["completed"] is True, one.text
        assert client.get(f"/api/{alice}/tasks/{first}", headers=auth).status_code == 200
        history = client.get(f"/api/tasks/{first}/history", headers=auth)
        assert history.status_code == 200 and len(history.json()["data"]) == 2, history.text
        feed = client.get("/api/history?limit=2", headers=auth)
        assert feed.status_code == 200 and len(feed.json()["data"]) == 2, feed.text
        rest = client.get("/api/history", headers=auth,
                          params={"cursor": feed.json()["meta"]["next_cursor"]})
        assert len(rest.json()["data"]) == TASKS["alice"] + 1 - 2, rest.text
        stats = client.get("/api/stats", headers=auth)
        assert stats.json()["data"] == {"total": 3, "completed": 1, "pending": 2}, stats.text
        # Another user's task: still a 403 (asked of the owner's function), an unknown one
        # a 404, for the task and its history.
        for path in (f"/api/tasks/{bobs}", f"/api/tasks/{bobs}/history"):
            assert client.get(path, headers=auth).status_code == 403, path
        for path in (f"/api/tasks/{uuid4()}", f"/api/tasks/{uuid4()}/history"):
            assert client.get(path, headers=auth).status_code == 404, path
        assert client.get("/api/stats", headers=bearer(bob)).json()["data"]["total"] == 2
        assert client.get("/api/ready").status_code == 200


@contextlib.contextmanager
def live_projector(dsn: str) -> Iterator[None]:
    loop = asyncio.new_event_loop()
    stop: list[asyncio.Event] = []
    started = threading.Event()

    async def main() -> None:
        stop.append(asyncio.Event())
        started.set()
        await run_projector(dsn, stop=stop[0], poll_interval=0.2)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(20)
        loop.close()


def test_the_stream_works_as_the_query_role_and_sends_only_the_users_changes(
    db: dict[str, Any],
):
    """The gap read (from the first position) and the hub's live reads, as the query
    role switching to the stream role; the projector as its role."""
    url, carol, dave = db["url"], new_user(), new_user()  # the module's users stay as they are
    writer = Writer(url)
    try:
        before = sorted(str(writer.create(carol, f"carol {i}")) for i in range(2))
        writer.create(dave, "dave's")
        app = query_app(settings_for(as_role(url, QUERY_ROLE), stream_heartbeat_seconds=0.5))
        with live_projector(as_role(url, PROJECTOR_ROLE)), serve(app) as base:
            headers = {**bearer(carol), "Last-Event-ID": codec_for(url).encode(ZERO)}
            with SseClient(base + "/api/tasks/stream", headers=headers).open() as sse:
                gap = sse.take(len(before))  # read as a gap: the hub started after them
                assert sorted(e.json()["id"] for e in gap) == before
                writer.create(dave, "not for carol")
                new = str(writer.create(carol, "live"))
                (live,) = sse.take(1)
                assert live.json()["id"] == new and live.json()["user_id"] == carol
                assert sse.quiet(0.5) == []
            listed = httpx.get(base + "/api/tasks", headers=bearer(carol)).json()
            assert listed["meta"]["total"] == 3, listed
    finally:
        writer.close()


# -- the roles and policies db init makes -----------------------------------------------


def policies(conn: psycopg.Connection[Any], table: str) -> set[tuple[Any, ...]]:
    return {tuple(r) for r in conn.execute(
        "SELECT policyname, permissive, roles::text, cmd, qual, with_check FROM pg_policies"
        " WHERE schemaname = current_schema() AND tablename = %s", (table,))}


def test_db_init_makes_exactly_its_policies_again(db: dict[str, Any]):
    url = db["url"]
    with psycopg.connect(url, autocommit=True) as conn:
        before = {t: policies(conn, t) for t in table_names(LIVE)}
        everyone = conn.execute(f"SELECT count(*) FROM {LIVE.tasks}").fetchone()
        # A hand-made policy that would let the query role read everyone's tasks.
        conn.execute(f"CREATE POLICY everyone ON {LIVE.tasks} FOR SELECT TO {QUERY_ROLE}"
                     " USING (true)")
        conn.execute(f"ALTER TABLE {LIVE.history} DISABLE ROW LEVEL SECURITY")
    with psycopg.connect(as_role(url, QUERY_ROLE)) as conn:
        assert conn.execute(f"SELECT count(*) FROM {LIVE.tasks}").fetchone() == everyone
    init_database(settings_for(url), environ={})
    with psycopg.connect(url) as conn:
        for table in table_names(LIVE):
            assert policies(conn, table) == before[table], table
            assert len(before[table]) == len(row_policies(table))
            assert conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class"
                                " WHERE oid = %s::regclass", (table,)).fetchone() == (True, False)
    with psycopg.connect(as_role(url, QUERY_ROLE)) as conn:
        for table in table_names(LIVE):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,), table


def test_the_query_role_does_not_inherit_the_stream_roles_policy(db: dict[str, Any]):
    with psycopg.connect(db["url"]) as conn:
        assert conn.execute(
            "SELECT pg_has_role(%s, %s, 'USAGE'), pg_has_role(%s, %s, 'MEMBER'),"
            " (SELECT rolcanlogin OR rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s)",
            (QUERY_ROLE, STREAM_ROLE, QUERY_ROLE, STREAM_ROLE, STREAM_ROLE)).fetchone() == (
                False, True, False)
    alice = db["users"]["alice"]
    with psycopg.connect(as_role(db["url"], QUERY_ROLE)) as conn:
        # The streams' setting admits nothing to the query role itself ...
        conn.execute("SELECT set_config('taskservice.user_ids', %s, false)", (f"{{{alice}}}",))
        assert conn.execute(f"SELECT count(*) FROM {LIVE.tasks}").fetchone() == (0,)
        # ... only once it has become the stream role.
        conn.execute(f"SET ROLE {STREAM_ROLE}")
        assert conn.execute(f"SELECT DISTINCT user_id FROM {LIVE.tasks}").fetchall() == [(alice,)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"DELETE FROM {LIVE.tasks}")


def test_replay_gives_the_rebuilt_tables_the_same_row_security(db: dict[str, Any]):
    url = db["url"]
    with psycopg.connect(url) as conn:
        before = {t: policies(conn, t) for t in table_names(LIVE)}
        oids = {t: conn.execute("SELECT %s::regclass::oid", (t,)).fetchone() for t in before}
    result = asyncio.run(replay(url))
    assert result.switched
    with psycopg.connect(url) as conn:
        for table in table_names(LIVE):
            assert conn.execute("SELECT %s::regclass::oid", (table,)).fetchone() != oids[table]
            assert policies(conn, table) == before[table], table
            assert any(p[0] == USER_POLICY for p in before[table])
            assert conn.execute("SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass",
                                (table,)).fetchone() == (True,)

    async def read() -> None:
        alice = db["users"]["alice"]
        async with query_reader(url, alice) as reader:
            assert await owners(reader, UNFILTERED[0]) == {alice: TASKS["alice"]}
        async with query_reader(url, None) as reader, reader.connection() as conn:
            assert await conn.fetchval(f"SELECT count(*) FROM {LIVE.tasks}") == 0

    asyncio.run(read())


def test_db_init_without_createrole_passes_once_the_roles_exist(pg_server: PostgresServer):
    """A managed PostgreSQL's owner may lack CREATEROLE once an administrator made the
    roles (here the earlier db inits did): db init then only checks the memberships."""
    owner = f"rls_owner_{uuid4().hex[:8]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {owner} LOGIN NOCREATEROLE NOSUPERUSER")
    url = pg_server.create_database(prefix="taskservice_rls_owner")
    try:
        name = url.rsplit("/", 1)[-1]
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" OWNER TO {owner}')
        init_database(settings_for(as_role(url, owner)), environ={})
        with psycopg.connect(url) as conn:
            assert conn.execute(
                "SELECT count(*), bool_and(relrowsecurity), min(pg_get_userbyid(relowner))"
                " FROM pg_class WHERE oid = ANY(%s::regclass[])",
                (table_names(LIVE),)).fetchone() == (len(table_names(LIVE)), True, owner)
    finally:
        pg_server.drop_database(url)
        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {owner}")


def test_the_stream_role_holds_exactly_its_declared_privileges(db: dict[str, Any]):
    with psycopg.connect(db["url"]) as conn:
        for table, by_role in grants().items():
            declared = {p.split(" ")[0] for p in by_role.get(STREAM_ROLE, ())}
            held = {p for p in PRIVILEGES if held_on(conn, STREAM_ROLE, table, p)}
            assert held == declared, table
        assert {t for t, by_role in grants().items() if STREAM_ROLE in by_role} == {
            *table_names(LIVE), LIVE.checkpoints, EVENTS_TABLE}
