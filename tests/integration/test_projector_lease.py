"""The projector's lease and its epoch fence (`projections.lease`, issue 18 point 5),
against a real PostgreSQL: a batch of a stale epoch commits nothing, even one whose
backend nobody could end; a standby ends a hung holder (as the projector role, which
may end its own role's backends) and takes over within the bound; a projector that lost
its lease stands by and writes nothing; the fence survives a replay's switch; and
`db init` adds the lease to an existing database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from projections import lease as leases
from projections import projector
from projections.admin import projection_status, status_main
from projections.lease import LeaseLost, LeaseTimes
from projections.replay import replay
from shared.catalog import LEASES_TABLE, LIVE, PROJECTION, projector_lock
from shared.position import ZERO
from shared.settings import Settings, SettingsError
from taskctl.dbinit import PROJECTOR_ROLE, init_database
from tests.support import TEST_SECRET, as_role, new_user
from tests.support.projection import (
    Writer,
    catch_up,
    checkpoint,
    eventually,
    max_position,
    settings_for,
    snapshot,
)

FAST = LeaseTimes(lease=1.0, heartbeat=0.2)
ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture
def writer(own_db: str) -> Iterator[Writer]:
    w = Writer(own_db)
    yield w
    w.close()


class Running:
    """`projector.run` in this event loop, with its metrics (role, epoch)."""

    def __init__(self, url: str, times: LeaseTimes = FAST) -> None:
        self.stop = asyncio.Event()
        self.metrics = projector.ProjectorMetrics()
        self.task = asyncio.create_task(projector.run(
            url, poll_interval=0.1, max_backoff=0.3, stop=self.stop, metrics=self.metrics,
            lease=times))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def started() -> AsyncIterator[list[Running]]:
    running: list[Running] = []
    yield running
    for r in running:
        await r.close()


def lease_row(url: str) -> dict:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT l.epoch, l.holder, l.backends, l.expires_at, l.acquired_at, c.epoch"
            f" FROM {LEASES_TABLE} l JOIN {LIVE.checkpoints} c USING (projection)"
            " WHERE l.projection = %s", (PROJECTION,)).fetchone()
    assert row is not None
    return dict(zip(("epoch", "holder", "backends", "expires_at", "acquired_at",
                     "checkpoint_epoch"), row, strict=True))


def caught_up(url: str) -> bool:
    return checkpoint(url) == max_position(url)


async def holder(url: str, name: str) -> tuple[asyncpg.Connection, asyncpg.Connection,
                                                 leases.Lease]:
    """A projector by hand: (its lock connection, holding the advisory lock and the
    lease; its work connection, recorded in the lease; the lease)."""
    lock = await asyncpg.connect(url)
    work = await asyncpg.connect(url)
    assert await lock.fetchval(projector.TRY_LOCK, projector_lock(PROJECTION))
    await projector.ensure_checkpoint(work)
    lease = await leases.take_over(lock, PROJECTION, name, FAST, [work.get_server_pid()])
    return lock, work, lease


# -- the fence ----------------------------------------------------------------------------


async def test_a_batch_of_a_stale_epoch_commits_nothing(own_db: str, writer: Writer) -> None:
    user = new_user()
    for n in range(3):
        writer.create(user, f"task {n}")
    lock, work, lease = await holder(own_db, "first")
    try:
        assert lease.epoch == 1 and lease_row(own_db)["checkpoint_epoch"] == 1
        with psycopg.connect(own_db) as conn:  # what a takeover writes into the row
            conn.execute(f"UPDATE {LIVE.checkpoints} SET epoch = 2")

        with pytest.raises(LeaseLost, match="another projector took over"):
            await projector.step(work, epoch=1)
        assert checkpoint(own_db) == ZERO
        assert all(rows == [] for rows in snapshot(own_db).values())

        position, count = await projector.step(work, epoch=2)
        assert count == 3 and checkpoint(own_db) == position
    finally:
        await lock.close()
        await work.close()


async def test_a_takeover_waits_for_the_batch_in_hand_then_no_batch_of_the_old_epoch_commits(
    own_db: str, writer: Writer
) -> None:
    """The old holder's work connection is not in its lease here, so the takeover cannot
    end it (as if it could not signal it): its batch in hand commits before the new epoch
    (the row lock orders them), and every later batch of the old epoch commits nothing."""
    user = new_user()
    task = writer.create(user, "blocked")
    old_lock = await asyncpg.connect(own_db)
    old_work = await asyncpg.connect(own_db)
    blocker = await asyncpg.connect(own_db)
    new_lock = await asyncpg.connect(own_db)
    try:
        assert await old_lock.fetchval(projector.TRY_LOCK, projector_lock(PROJECTION))
        await projector.ensure_checkpoint(old_work)
        old = await leases.take_over(old_lock, PROJECTION, "old", FAST, [])
        await projector.step(old_work, epoch=old.epoch)

        # The old holder's next batch stops mid-way, holding the checkpoint row (a table
        # lock takes no transaction id: the projector's safe bound does not wait for it).
        blocker_tx = blocker.transaction()
        await blocker_tx.start()
        await blocker.execute("LOCK TABLE read_tasks IN SHARE MODE")
        writer.change(user, task, title="renamed")
        in_hand = asyncio.ensure_future(projector.step(old_work, epoch=old.epoch))
        await asyncio.sleep(0.3)
        assert not in_hand.done()

        # The old holder's lock backend is ended by the takeover (it is in the lease).
        new = asyncio.ensure_future(
            leases.take_over(new_lock, PROJECTION, "new", FAST, []))
        await asyncio.sleep(0.3)
        assert not new.done()  # it waits for the batch in hand
        await blocker_tx.rollback()
        _, count = await asyncio.wait_for(in_hand, 5)
        assert count == 1  # committed under the old epoch, before the takeover
        taken = await asyncio.wait_for(new, 5)
        assert taken.epoch == old.epoch + 1 and old_lock.is_closed()

        writer.create(user, "after the takeover")
        before = checkpoint(own_db)
        with pytest.raises(LeaseLost):
            await projector.step(old_work, epoch=old.epoch)
        assert checkpoint(own_db) == before
        with psycopg.connect(own_db) as conn:
            assert conn.execute("SELECT count(*) FROM read_tasks WHERE title = %s",
                                ("after the takeover",)).fetchone() == (0,)
        _, count = await projector.step(old_work, epoch=taken.epoch)
        assert count == 1
    finally:
        for c in (old_lock, old_work, blocker, new_lock):
            if not c.is_closed():
                await c.close()


# -- taking over from a hung holder ----------------------------------------------------------


async def test_a_standby_ends_a_hung_holder_and_takes_over_within_the_bound(
    own_db: str, writer: Writer, started: list[Running]
) -> None:
    """Everything as the projector role: ending the hung holder's backends needs no more
    than the same role. The hung holder holds the advisory lock and, mid-batch, the
    checkpoint row; it never renews its lease."""
    url = as_role(own_db, PROJECTOR_ROLE)
    user = new_user()
    writer.create(user, "before")
    lock, work, lease = await holder(url, "hung")
    hung_tx = work.transaction()
    await hung_tx.start()
    await work.execute(f"SELECT 1 FROM {LIVE.checkpoints} WHERE projection = $1 FOR UPDATE",
                       PROJECTION)
    granted = lease_row(own_db)
    try:
        standby = Running(url)
        started.append(standby)
        await eventually(lambda: standby.metrics.role == "standby", timeout=5)
        for n in range(5):
            writer.create(user, f"while hung {n}")
        await eventually(lambda: standby.metrics.role == "active", timeout=10)
        took_over = lease_row(own_db)
        await eventually(lambda: caught_up(own_db), timeout=5)
    finally:
        ended = (lock.is_closed(), work.is_closed())
        for c in (lock, work):
            c.terminate()

    assert took_over["epoch"] == lease.epoch + 1 == took_over["checkpoint_epoch"]
    assert took_over["holder"] != "hung" and standby.metrics.epoch == took_over["epoch"]
    # Not before the hung holder's lease had lapsed, by the database's clock, and within
    # a heartbeat (and the time to end its backends) after.
    waited = (took_over["acquired_at"] - granted["expires_at"]).total_seconds()
    assert 0 <= waited <= FAST.heartbeat + 1.0 + 1.0, waited  # + 1 s for a busy machine
    assert ended == (True, True) or await _gone(own_db, granted["backends"])
    with psycopg.connect(own_db) as conn:
        assert conn.execute("SELECT total FROM read_user_stats WHERE user_id = %s",
                            (user,)).fetchone() == (6,)


async def _gone(url: str, pids: list[int]) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                            (pids,)).fetchone() == (0,)


async def test_a_healthy_holder_keeps_its_lease_and_status_shows_it(
    own_db: str, writer: Writer, started: list[Running], capsys: pytest.CaptureFixture[str]
) -> None:
    active = Running(own_db)
    started.append(active)
    await eventually(lambda: active.metrics.role == "active", timeout=5)
    first = lease_row(own_db)
    standby = Running(own_db)
    started.append(standby)
    await asyncio.sleep(FAST.lease * 3)  # three leases long: renewed, never taken over

    again = lease_row(own_db)
    assert (again["epoch"], again["holder"]) == (first["epoch"], first["holder"])
    assert again["expires_at"] > first["expires_at"]
    assert standby.metrics.role == "standby" and active.metrics.role == "active"
    status = (await projection_status(own_db))[0]
    assert status["lease"]["epoch"] == first["epoch"] == status["lease"]["checkpoint_epoch"]
    assert status["lease"]["holder"] == first["holder"] and not status["lease"]["lapsed"]
    assert 0 < status["lease"]["expires_in_seconds"] <= FAST.lease
    assert await asyncio.to_thread(status_main, own_db, as_json=False) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("lease "))
    pids = ", ".join(map(str, first["backends"]))
    assert f"epoch {first['epoch']}, {first['holder']} (backends {pids}), expires in" in line

    await active.close()  # a clean stop releases the lease: the standby takes over at once
    started.remove(active)
    stopped = time.monotonic()
    await eventually(lambda: standby.metrics.role == "active", timeout=5)
    assert time.monotonic() - stopped < FAST.lease
    assert lease_row(own_db)["epoch"] == first["epoch"] + 1


async def test_a_projector_that_lost_its_lease_stands_by_and_writes_nothing(
    own_db: str, writer: Writer, started: list[Running]
) -> None:
    user = new_user()
    writer.create(user, "one")
    old = Running(own_db)
    started.append(old)
    await eventually(lambda: old.metrics.role == "active" and caught_up(own_db), timeout=5)
    epoch = old.metrics.epoch
    assert epoch is not None

    # Another projector takes over (as a standby does after the lease lapsed): it ends
    # the old one's backends and holds the lock and a newer lease from now on.
    lock = await asyncpg.connect(own_db)
    work = await asyncpg.connect(own_db)
    try:
        waiting = asyncio.ensure_future(
            lock.fetchval(projector.WAIT_LOCK, projector_lock(PROJECTION)))
        with psycopg.connect(own_db, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE application_name = %s AND datname = current_database()",
                         (projector.LOCK_APPLICATION_NAME,))
        await asyncio.wait_for(waiting, 5)
        new = await leases.take_over(lock, PROJECTION, "another", FAST, [work.get_server_pid()])
        heart = asyncio.ensure_future(leases.keep(lock, new))
        assert new.epoch == epoch + 1

        await eventually(lambda: old.metrics.role == "standby", timeout=5)
        before = checkpoint(own_db)
        writer.create(user, "two")
        await asyncio.sleep(FAST.lease * 2)
        assert checkpoint(own_db) == before  # the old one applied nothing
        assert old.metrics.role == "standby" and lease_row(own_db)["epoch"] == new.epoch
        heart.cancel()
    finally:
        await lock.close()  # the new holder goes: the old one, a standby, takes over
        await work.close()
    await eventually(lambda: old.metrics.role == "active" and caught_up(own_db), timeout=5)
    assert old.metrics.epoch == epoch + 2


async def test_a_heartbeat_that_finds_a_newer_epoch_stops_the_old_epochs_batches(
    own_db: str, writer: Writer, started: list[Running]
) -> None:
    only = Running(own_db)
    started.append(only)
    await eventually(lambda: only.metrics.role == "active", timeout=5)
    epoch = only.metrics.epoch
    assert epoch is not None

    def bump() -> None:  # as a takeover would, behind its back (it waits for a batch)
        with psycopg.connect(own_db) as conn:
            conn.execute(f"UPDATE {LEASES_TABLE} SET epoch = epoch + 10")
            conn.execute(f"UPDATE {LIVE.checkpoints} SET epoch = epoch + 10")

    await asyncio.to_thread(bump)  # off the event loop the projector runs in
    # It stops, stands by, finds nobody holding the lock and takes over anew.
    await eventually(lambda: only.metrics.epoch == epoch + 11, timeout=5)
    writer.create(new_user(), "after")
    await eventually(lambda: caught_up(own_db), timeout=5)


async def test_a_heartbeat_that_cannot_renew_in_time_stops_the_projector(
    own_db: str, writer: Writer, started: list[Running]
) -> None:
    """Its renewals wait on the lease row (held locked here, as a hung database would
    hold them): within its lease it stops projecting, applies nothing more, and once it
    can renew again it takes over anew."""
    user = new_user()
    only = Running(own_db)
    started.append(only)
    await eventually(lambda: only.metrics.role == "active", timeout=5)
    epoch = only.metrics.epoch
    assert epoch is not None
    blocker = await asyncpg.connect(own_db)
    try:
        held = blocker.transaction()
        await held.start()
        await blocker.execute(f"SELECT 1 FROM {LEASES_TABLE} FOR UPDATE")
        blocked = time.monotonic()
        await eventually(lambda: only.metrics.role != "active", timeout=FAST.lease * 3)
        assert time.monotonic() - blocked <= FAST.lease + FAST.heartbeat + 1.0
        before = checkpoint(own_db)
        writer.create(user, "while it cannot renew")
        await asyncio.sleep(FAST.lease * 1.5)
        assert checkpoint(own_db) == before and only.metrics.role != "active"
        await held.rollback()
    finally:
        await blocker.close()
    await eventually(lambda: only.metrics.role == "active" and caught_up(own_db), timeout=10)
    assert only.metrics.epoch is not None and only.metrics.epoch > epoch


# -- replay, db init, settings ---------------------------------------------------------------


async def test_the_fence_survives_a_replay_switch(
    own_db: str, writer: Writer, started: list[Running]
) -> None:
    user = new_user()
    for n in range(20):
        writer.create(user, f"task {n}")
    active = Running(own_db)
    started.append(active)
    await eventually(lambda: active.metrics.role == "active" and caught_up(own_db), timeout=5)
    epoch = active.metrics.epoch

    switched = await replay(own_db)
    in_place = await replay(own_db, in_place=True)
    assert switched.switched and in_place.in_place

    assert lease_row(own_db)["checkpoint_epoch"] == epoch == lease_row(own_db)["epoch"]
    writer.create(user, "after the replays")
    await eventually(lambda: caught_up(own_db), timeout=5)
    assert active.metrics.epoch == epoch and active.metrics.role == "active"  # never fenced
    with psycopg.connect(own_db) as conn:
        assert conn.execute("SELECT total FROM read_user_stats WHERE user_id = %s",
                            (user,)).fetchone() == (21,)


def test_db_init_adds_the_lease_to_an_existing_database_and_runs_again(own_db: str) -> None:
    with psycopg.connect(own_db) as conn:  # a database from before the lease
        conn.execute(f"DROP TABLE {LEASES_TABLE}")
        conn.execute(f"ALTER TABLE {LIVE.checkpoints} DROP COLUMN epoch")
    asyncio.run(catch_up(own_db))
    for _ in range(2):
        init_database(settings_for(own_db))
    with psycopg.connect(own_db) as conn:
        assert conn.execute(
            "SELECT has_table_privilege(%s, %s, 'SELECT, INSERT, UPDATE'),"
            " has_table_privilege(%s, %s, 'DELETE')",
            (PROJECTOR_ROLE, LEASES_TABLE, PROJECTOR_ROLE, LEASES_TABLE)).fetchone() == (
                True, False)
        assert conn.execute(f"SELECT epoch FROM {LIVE.checkpoints}").fetchall() == [(0,)]


def test_a_projector_on_a_database_from_before_the_lease_exits_1_saying_run_db_init(
    own_db: str,
) -> None:
    with psycopg.connect(own_db) as conn:
        conn.execute(f"DROP TABLE {LEASES_TABLE}")
        conn.execute(f"ALTER TABLE {LIVE.checkpoints} DROP COLUMN epoch")
    env = {**os.environ, "DATABASE_URL": own_db, "ENVIRONMENT": "test", "METRICS_PORT": "0"}
    done = subprocess.run([sys.executable, "-m", "taskctl.cli", "projector"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "run `taskctl db init`" in done.stderr and "Traceback" not in done.stderr


def test_the_heartbeat_must_fit_twice_in_the_lease() -> None:
    with pytest.raises(SettingsError, match="PROJECTOR_HEARTBEAT_SECONDS"):
        Settings.from_env({"PROJECTOR_LEASE_SECONDS": "3", "PROJECTOR_HEARTBEAT_SECONDS": "2"},
                          require_auth=False)
    settings = Settings(environment="test", better_auth_secret=TEST_SECRET)
    assert LeaseTimes.from_settings(settings) == LeaseTimes() == LeaseTimes(10.0, 2.0)
    assert LeaseTimes().takeover == 13.0
