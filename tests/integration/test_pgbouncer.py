"""The APIs through a real PgBouncer in transaction mode (`tests/support/pgbouncer.py`)
with `DB_TRANSACTION_POOLER`, the projector connected directly (its session advisory
lock and LISTEN need a session of their own).

Proves: what asyncpg does by default fails through it (a startup parameter PgBouncer
refuses; prepared statements another client's transaction then lacks), and with the
setting, concurrent commands and reads of several users succeed and are correct
(read-your-own-writes included: the query API's watch polls instead of LISTEN) while
PgBouncer serves every client connection of both APIs over at most 3 server
connections."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import psycopg
import pytest

from command_api.app import create_app as create_command_app
from query_api.app import create_app as create_query_app
from shared.pools import pool_options
from shared.settings import Settings
from tests.support import TEST_SECRET, PostgresServer, bearer, database_name, new_user
from tests.support.live import serve
from tests.support.pgbouncer import PgBouncer
from tests.support.projection import fresh_database

SERVER_CONNECTIONS = 3
USERS, TASKS = 6, 8


# What the APIs send at connection start when direct (shared.pools.server_settings),
# set on the database behind PgBouncer instead (in production: ALTER ROLE for each API's
# role). jit off: asyncpg's type introspection query is planned far above
# jit_above_cost, and compiling it took 1.3-2.8 s on this machine, past the 1.5 s
# statement timeout (a 503 on a new connection's first use of an array type).
BEHIND_THE_POOLER = {"statement_timeout": "1500ms", "idle_in_transaction_session_timeout": "10s",
                     "jit": "off"}


@pytest.fixture(scope="module")
def database_url(pg_server: PostgresServer) -> Iterator[str]:
    """A database of this module's own, set up as docs/scaling.md says for PgBouncer."""
    url = fresh_database(pg_server)
    with psycopg.connect(url, autocommit=True) as conn:
        for name, value in BEHIND_THE_POOLER.items():
            conn.execute(f'ALTER DATABASE "{database_name(url)}" SET {name} = \'{value}\'')
    yield url
    pg_server.drop_database(url)


@pytest.fixture(scope="module")
def bouncer(pg_server: PostgresServer, database_url: str) -> Iterator[PgBouncer]:
    with PgBouncer(pg_server.url, pool_size=SERVER_CONNECTIONS) as b:
        yield b


@pytest.fixture(scope="module")
def pooled(bouncer: PgBouncer, database_url: str) -> Settings:
    return Settings(environment="test", better_auth_secret=TEST_SECRET,
                    database_url=bouncer.url(database_name(database_url)),
                    db_transaction_pooler=True, read_wait_timeout=5)


async def test_asyncpg_defaults_fail_through_pgbouncer_and_the_setting_fixes_them(
    pooled: Settings,
):
    url = pooled.database_url
    assert url is not None
    direct = pooled.model_copy(update={"db_transaction_pooler": False})
    # Our server settings at connection start: PgBouncer refuses them by name.
    with pytest.raises(asyncpg.ProtocolViolationError, match="unsupported startup parameter"):
        await asyncpg.connect(url, **pool_options(direct, url, "t"))
    # asyncpg's statement cache: another client's transaction gets the server connection.
    a, b = [await asyncpg.connect(url) for _ in range(2)]
    try:
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            for i in range(50):
                await asyncio.gather(a.fetchval("SELECT $1::int", i),
                                     b.fetchval("SELECT $1::int + 1", i))
    finally:
        await asyncio.gather(a.close(), b.close())
    # With DB_TRANSACTION_POOLER: application_name only, no cache; interleaving is fine.
    options = pool_options(pooled, url, "t")
    assert options["statement_cache_size"] == 0
    assert set(options["server_settings"]) == {"application_name"}
    a, b = [await asyncpg.connect(url, **options) for _ in range(2)]
    try:
        # The server's own timeouts, from the database's settings.
        assert await a.fetchval("SHOW statement_timeout") == "1500ms"
        assert await a.fetchval("SHOW jit") == "off"
        for i in range(200):
            assert await asyncio.gather(a.fetchval("SELECT $1::int", i),
                                        b.fetchval("SELECT $1::int + 1", i)) == [i, i + 1]
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_commands_and_reads_through_pgbouncer_in_transaction_mode(
    bouncer: PgBouncer, pooled: Settings, database_url: str, projector: asyncio.Task[None]
):
    users = [new_user() for _ in range(USERS)]
    peak_clients = 0

    async def flow(client_c: httpx.AsyncClient, client_q: httpx.AsyncClient, user: str) -> None:
        ids = []
        for i in range(TASKS):
            r = await client_c.post("/api/tasks", json={"title": f"pooled {i}"},
                                    headers={**bearer(user), "Idempotency-Key": f"k{i}"})
            assert r.status_code == 201, r.text
            task = r.json()["data"]
            ids.append(task["id"])
            # Read-your-own-writes with no header, through the pooler.
            got = await client_q.get(f"/api/tasks/{task['id']}", headers=bearer(user))
            assert got.status_code == 200, got.text
            assert got.json()["data"] == task and got.json()["meta"]["stale"] is False
            if i % 2:
                done = await client_c.patch(f"/api/tasks/{task['id']}/complete", headers=bearer(user))
                assert done.status_code == 200, done.text
        again = await client_c.post("/api/tasks", json={"title": "pooled 0"},
                                    headers={**bearer(user), "Idempotency-Key": "k0"})
        assert again.status_code == 201 and again.json()["data"]["id"] == ids[0]
        stats = await client_q.get("/api/stats", headers=bearer(user))
        assert stats.json()["data"] == {"total": TASKS, "completed": TASKS // 2,
                                        "pending": TASKS - TASKS // 2}
        listed = await client_q.get("/api/tasks", headers=bearer(user))
        assert [t["id"] for t in listed.json()["data"]] == ids[::-1]
        feed = await client_q.get("/api/history", params={"limit": 100}, headers=bearer(user))
        assert len(feed.json()["data"]) == TASKS + TASKS // 2

    async def watch_pools(stop: asyncio.Event) -> None:
        nonlocal peak_clients
        name = database_name(database_url)
        while not stop.is_set():
            for pool in await asyncio.to_thread(bouncer.show, "POOLS"):
                if pool["database"] == name:
                    servers = sum(int(pool[k]) for k in ("sv_active", "sv_idle", "sv_used",
                                                          "sv_tested", "sv_login"))
                    assert servers <= SERVER_CONNECTIONS, pool
                    peak_clients = max(peak_clients, int(pool["cl_active"]) + int(pool["cl_waiting"]))
            await asyncio.sleep(0.05)

    command_app, query_app = create_command_app(pooled), create_query_app(pooled)
    with serve(command_app) as command_url, serve(query_app) as query_url:
        async with httpx.AsyncClient(base_url=command_url, timeout=30) as c, \
                httpx.AsyncClient(base_url=query_url, timeout=30) as q:
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_pools(stop))
            try:
                await asyncio.gather(*(flow(c, q, u) for u in users))
            finally:
                stop.set()
                await watcher
            ready = await q.get("/api/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["data"]["listening"] is False  # no LISTEN through the pooler
        watch: Any = query_app.state.read_side.watch
        assert watch.pooled is True and watch.listening is False
    # Both APIs' pools (up to 15 connections each) shared 3 server connections.
    assert peak_clients > SERVER_CONNECTIONS, peak_clients
    (stats,) = [s for s in await asyncio.to_thread(bouncer.show, "STATS")
                if s["database"] == database_name(database_url)]
    assert int(stats["total_xact_count"]) >= USERS * TASKS * 3
    print(f"\npgbouncer: {USERS} users x {TASKS} tasks, peak {peak_clients} client connections"
          f" over <= {SERVER_CONNECTIONS} server connections,"
          f" {stats['total_xact_count']} transactions")
    assert not projector.done()
