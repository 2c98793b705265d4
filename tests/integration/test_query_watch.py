"""The position watch behind read-your-writes, against a database of its own whose
checkpoint the tests move by hand (with and without NOTIFY)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from query_api.watch import APPLICATION_NAME, PositionWatch
from shared.catalog import PROJECTION
from shared.position import Position
from taskctl.dbinit import create_read_tables
from tests.support import PostgresServer


@pytest.fixture(scope="module")
async def dsn(pg_server: PostgresServer) -> AsyncIterator[str]:
    url = pg_server.create_database("taskservice_watch")
    create_read_tables(url)
    yield url
    pg_server.drop_database(url)


@pytest.fixture
async def db(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "INSERT INTO projection_checkpoints (projection, tx_id, position) VALUES ($1, '0', 0)"
        " ON CONFLICT (projection) DO UPDATE SET tx_id = '0', position = 0",
        PROJECTION,
    )
    yield conn
    await conn.close()


@pytest.fixture
async def watch(dsn: str) -> AsyncIterator[PositionWatch]:
    w = PositionWatch(dsn, recheck_interval=30, reconnect_delay=0.05)
    yield w
    await w.close()


def P(n: int) -> Position:
    """A position in the global order; the tests move both parts together."""
    return Position(n, n)


async def advance(db: asyncpg.Connection, position: int, *, notify: bool = True) -> None:
    async with db.transaction():
        await db.execute(
            "UPDATE projection_checkpoints SET tx_id = $2::bigint::text::xid8, position = $2"
            " WHERE projection = $1",
            PROJECTION,
            position,
        )
        if notify:
            await db.execute("SELECT pg_notify('projection_advanced', $1)", str(position))


async def later(seconds: float, action) -> None:
    await asyncio.sleep(seconds)
    await action


async def test_wakes_a_waiter_on_notify_long_before_its_recheck_timer(
    db: asyncpg.Connection, watch: PositionWatch
):
    started = time.monotonic()
    waiting = asyncio.create_task(watch.wait_for(P(7), timeout=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await advance(db, 7)
    assert await waiting is True
    assert time.monotonic() - started < 2  # the recheck timer is 30 s
    assert watch.known == P(7) and watch.listening


async def test_a_position_already_reached_returns_at_once(
    db: asyncpg.Connection, watch: PositionWatch
):
    await advance(db, 40, notify=False)
    started = time.monotonic()
    assert await watch.wait_for(P(40), timeout=5) is True
    assert await watch.wait_for(P(12), timeout=5) is True
    assert time.monotonic() - started < 2


async def test_gives_up_after_the_timeout_when_the_checkpoint_stays_behind(
    db: asyncpg.Connection, watch: PositionWatch
):
    await advance(db, 3)
    started = time.monotonic()
    assert await watch.wait_for(P(4), timeout=0.3) is False
    assert 0.3 <= time.monotonic() - started < 2
    assert watch._futures == {} and watch._waiters == {}


async def test_wakes_only_the_waiters_whose_position_was_reached(
    db: asyncpg.Connection, watch: PositionWatch
):
    low = asyncio.create_task(watch.wait_for(P(5), timeout=10))
    same = asyncio.create_task(watch.wait_for(P(5), timeout=10))
    high = asyncio.create_task(watch.wait_for(P(9), timeout=10))
    await asyncio.sleep(0.2)
    await advance(db, 6)
    assert await low is True and await same is True
    await asyncio.sleep(0.2)
    assert not high.done()
    await advance(db, 9)
    assert await high is True


async def test_a_lost_notification_is_caught_by_the_slow_recheck(dsn: str, db: asyncpg.Connection):
    watch = PositionWatch(dsn, recheck_interval=0.2)
    try:
        waiting = asyncio.create_task(watch.wait_for(P(11), timeout=5))
        await asyncio.sleep(0.3)
        await advance(db, 11, notify=False)
        started = time.monotonic()
        assert await waiting is True
        assert time.monotonic() - started < 1.5
    finally:
        await watch.close()


async def test_reconnects_by_itself_after_its_connection_is_killed(
    db: asyncpg.Connection, watch: PositionWatch
):
    assert await watch.wait_for(P(0), timeout=1) is True
    first = asyncio.create_task(watch.wait_for(P(2), timeout=5))
    await asyncio.sleep(0.2)
    await advance(db, 2)
    assert await first is True

    killed = await db.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE application_name = $1 AND datname = current_database()",
        APPLICATION_NAME,
    )
    assert killed == 1
    second = asyncio.create_task(watch.wait_for(P(3), timeout=5))
    for _ in range(50):  # until the watch listens again
        await asyncio.sleep(0.05)
        listening = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )
        if listening and watch.listening:
            break
    await advance(db, 3)
    assert await second is True
