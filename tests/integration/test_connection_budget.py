"""The start-up check of the connection budget (`shared.pools`): each API compares the
most its pool may hold, plus what is open on the server now, with `max_connections`
less the reserved slots, and warns (what the sum may reach, what the server allows,
which settings to change) when the pool could exhaust them; quiet otherwise.
Against the real server: its own `max_connections`, its own connections in use."""

from __future__ import annotations

import logging
import os

import asyncpg
import pytest
from fastapi.testclient import TestClient

from command_api.store import PostgresEventStore
from query_api.app import create_app as create_query_app
from shared.pools import check_connection_budget, server_settings
from shared.settings import Settings

WARNING = "connection budget:"


def budget_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "taskservice.pools" and r.levelno == logging.WARNING
            and r.getMessage().startswith(WARNING)]


async def server_limits(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int")
        return row[0], row[1]
    finally:
        await conn.close()


async def test_a_command_api_pool_bigger_than_the_server_allows_is_warned_about(
    settings: Settings, caplog: pytest.LogCaptureFixture
):
    max_connections, reserved = await server_limits(settings.require_database_url())
    big = settings.model_copy(update={"db_pool_size": max_connections, "db_max_overflow": 5})
    caplog.set_level(logging.WARNING, logger="taskservice.pools")
    store = await PostgresEventStore.open(big)
    try:
        [message] = budget_warnings(caplog)
    finally:
        await store.close()
    # What the sum may reach, what the server allows, which settings to change.
    assert f"the command API may hold {max_connections + 5} connections" in message
    assert f"max_connections {max_connections} minus {reserved}" in message
    assert f"DB_POOL_SIZE {max_connections} + DB_MAX_OVERFLOW 5" in message
    assert "Lower DB_POOL_SIZE / DB_MAX_OVERFLOW" in message
    assert "POSTGRES_MAX_CONNECTIONS" in message


async def test_a_pool_within_the_budget_is_not_warned_about(
    settings: Settings, caplog: pytest.LogCaptureFixture
):
    small = settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0})
    caplog.set_level(logging.WARNING, logger="taskservice.pools")
    store = await PostgresEventStore.open(small)
    try:
        async with store.pool.acquire() as conn:
            budget = await check_connection_budget(conn, process="test", wanted=1,
                                                   made_of="one")
    finally:
        await store.close()
    assert not budget.exhaustible and budget.reach < budget.allowed, budget
    assert budget_warnings(caplog) == []


def test_the_query_api_warns_at_start_up_counting_its_listen_connection(
    settings: Settings, caplog: pytest.LogCaptureFixture
):
    import asyncio

    max_connections, _ = asyncio.run(server_limits(settings.require_database_url()))
    big = settings.model_copy(update={"db_pool_size": max_connections, "db_max_overflow": 0})
    caplog.set_level(logging.WARNING, logger="taskservice.pools")
    with TestClient(create_query_app(big)) as client:
        assert client.get("/api/ready").status_code in (200, 503)
    [message] = budget_warnings(caplog)
    assert f"the query API may hold {max_connections + 1} connections" in message
    assert f"DB_POOL_SIZE {max_connections} + DB_MAX_OVERFLOW 0 + 1 LISTEN)" in message

    caplog.clear()
    small = settings.model_copy(update={"db_pool_size": 2, "db_max_overflow": 0})
    with TestClient(create_query_app(small)) as client:
        assert client.get("/api/ready").status_code in (200, 503)
    assert budget_warnings(caplog) == []


async def test_each_connection_carries_the_statement_and_idle_timeouts(settings: Settings):
    store = await PostgresEventStore.open(settings)
    try:
        async with store.pool.acquire() as conn:
            statement, idle, name = await conn.fetchrow(
                "SELECT current_setting('statement_timeout'),"
                " current_setting('idle_in_transaction_session_timeout'),"
                " current_setting('application_name')")
    finally:
        await store.close()
    assert statement == f"{round(settings.db_statement_timeout * 1000)}ms"
    assert idle == f"{round(settings.db_idle_in_transaction_timeout)}s"
    assert name == (os.environ.get("PGAPPNAME") or "taskservice-command-api")


def test_server_settings_leave_alone_what_the_url_names(settings: Settings):
    url = "postgresql://u@h/db?statement_timeout=5000&application_name=mine"
    sent = server_settings(settings, url, "taskservice-test")
    assert "statement_timeout" not in sent and "application_name" not in sent
    assert sent["idle_in_transaction_session_timeout"] == "10000ms"
    off = settings.model_copy(update={"db_idle_in_transaction_timeout": 0})
    assert "idle_in_transaction_session_timeout" not in server_settings(off, url, "x")
