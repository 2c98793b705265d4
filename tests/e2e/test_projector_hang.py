"""Two real `taskctl projector` processes, the active one SIGSTOPped mid-batch (issue 18,
point 5): the standby ends it and takes over within the lease's bound while writes go on,
the read tables reach the head; continued, the old one commits no batch and stands by;
and it is a working standby (it takes over when the new one stops).

Both run as the projector role (`taskservice_projector`), as in production: ending the
hung one's backends needs nothing more. The hung one is stopped while its batch waits on a
table lock the test holds, so it is stopped holding the checkpoint row in an open
transaction: the takeover must end it, not just outwait it.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from projections.projector import APPLICATION_NAME
from shared.catalog import EVENTS_TABLE, LEASES_TABLE, LIVE, PROJECTION
from taskctl.dbinit import PROJECTOR_ROLE, create_read_tables
from tests.support import TEST_SECRET, as_role, new_user
from tests.support.process import Proc, free_port
from tests.support.projection import (
    REBUILD,
    Writer,
    catch_up,
    checkpoint,
    max_position,
    snapshot,
    wait_until,
)

pytestmark = pytest.mark.slow

LEASE, HEARTBEAT = 3.0, 0.5
BOUND = LEASE + HEARTBEAT + 1.0  # projections.lease: a takeover within lease + heartbeat + 1 s
SLACK = 2.0  # a busy 2-core machine



class Projector:
    """One `taskctl projector` process as the projector role, with its /health and
    /metrics; stopped (continued first) by its own PID."""

    def __init__(self, url: str, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "DATABASE_URL": as_role(url, PROJECTOR_ROLE),
               "ENVIRONMENT": "test", "BETTER_AUTH_SECRET": TEST_SECRET, "LOG_LEVEL": "INFO",
               "METRICS_PORT": str(self.port), "PROJECTOR_LEASE_SECONDS": str(LEASE),
               "PROJECTOR_HEARTBEAT_SECONDS": str(HEARTBEAT)}
        self.proc = Proc([sys.executable, "-m", "taskctl.cli", "projector", "--poll-interval",
                          "0.2", "--batch-size", "50"], log, env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).json()["data"]

    def role(self) -> str | None:
        try:
            return self.health()["role"]
        except httpx.TransportError:
            return None

    def batches(self) -> float:
        """Batches this process has committed (its projector_batch_events histogram)."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        match = re.search(r"^projector_batch_events_count (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def close(self) -> int:
        if self.proc.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
        return self.proc.stop()


@pytest.fixture
def projectors() -> Iterator[list[Projector]]:
    started: list[Projector] = []
    yield started
    for p in started:
        p.close()


def lease(url: str) -> dict:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT epoch, holder, backends, expires_at, acquired_at FROM {LEASES_TABLE}"
            " WHERE projection = %s", (PROJECTION,)).fetchone()
    assert row is not None
    return dict(zip(("epoch", "holder", "backends", "expires_at", "acquired_at"), row,
                    strict=True))


def caught_up(url: str) -> bool:
    return checkpoint(url) == max_position(url)


def batch_waits_on_a_lock(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND wait_event_type = 'Lock'"
            " AND xact_start IS NOT NULL", (APPLICATION_NAME,)).fetchone()
    return bool(row and row[0])


def alive(url: str, pids: list[int]) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                           (pids,)).fetchone()
    return row[0] if row else 0


def write_until(url: str, stop: threading.Event, done: list[int]) -> None:
    writer = Writer(url)
    user = new_user()
    try:
        while not stop.is_set():
            task = writer.create(user, f"during the hang {done[0]}")
            writer.change(user, task, completed=True)
            done[0] += 2
    finally:
        writer.close()


async def test_a_sigstopped_projector_is_replaced_within_the_bound_and_never_writes_again(
    own_db: str, projectors: list[Projector], tmp_path: Path
) -> None:
    writer = Writer(own_db)
    user = new_user()
    try:
        tasks = [writer.create(user, f"task {n}") for n in range(10)]
        old = Projector(own_db, tmp_path / "old.log")
        projectors.append(old)
        old.proc.wait_http(f"http://127.0.0.1:{old.port}/health")
        wait_until(lambda: old.role() == "active")
        new = Projector(own_db, tmp_path / "new.log")
        projectors.append(new)
        new.proc.wait_http(f"http://127.0.0.1:{new.port}/health")
        wait_until(lambda: new.role() == "standby")
        wait_until(lambda: caught_up(own_db))
        granted = lease(own_db)
        assert old.health()["epoch"] == granted["epoch"]

        # The old one's next batch waits on a table lock; it is stopped right there,
        # inside its transaction, with the checkpoint row locked.
        with psycopg.connect(own_db) as blocker:
            blocker.execute(f"LOCK TABLE {LIVE.tasks} IN SHARE MODE")
            writer.change(user, tasks[0], title="renamed while it hangs")
            wait_until(lambda: batch_waits_on_a_lock(own_db))
            committed = old.batches()
            os.kill(old.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            blocker.rollback()
        time.sleep(0.3)  # a renewal in flight has landed: the lease is final now
        hung = lease(own_db)
        assert hung["epoch"] == granted["epoch"] and alive(own_db, hung["backends"]) == 2

        stop, done = threading.Event(), [0]
        writing = threading.Thread(target=write_until, args=(own_db, stop, done))
        writing.start()
        try:
            wait_until(lambda: lease(own_db)["epoch"] > hung["epoch"], timeout=BOUND + 10)
            took = time.monotonic() - stopped
            time.sleep(1.0)  # writes go on under the new holder
        finally:
            stop.set()
            writing.join(timeout=30)
        taken = lease(own_db)
        wait_until(lambda: caught_up(own_db), timeout=30)

        print(f"\nprojector hang: SIGSTOP mid-batch, taken over after {took:.2f}s (bound"
              f" {BOUND:g}s), lease epoch {hung['epoch']} -> {taken['epoch']},"
              f" {done[0]} commands during the takeover")
        assert took <= BOUND + SLACK, took
        # By the database's clock: not before the hung one's lease lapsed, and within a
        # heartbeat (+ the time to end its backends) after.
        waited = (taken["acquired_at"] - hung["expires_at"]).total_seconds()
        assert 0 <= waited <= HEARTBEAT + 1.0 + SLACK, waited
        assert taken["epoch"] == hung["epoch"] + 1 and f":{new.pid}:" in taken["holder"]
        assert new.health()["role"] == "active" and new.health()["epoch"] == taken["epoch"]
        assert alive(own_db, hung["backends"]) == 0  # its backends were ended
        assert done[0] >= 2

        # Continued, the old one commits nothing and stands by.
        os.kill(old.pid, signal.SIGCONT)
        for n in range(5):
            writer.create(user, f"after it woke {n}")
        wait_until(lambda: old.role() == "standby", timeout=BOUND + 10)
        wait_until(lambda: caught_up(own_db), timeout=30)
        time.sleep(HEARTBEAT * 3)
        assert old.proc.proc.poll() is None
        assert old.batches() == committed  # not even the batch it was stopped in
        assert lease(own_db)["epoch"] == taken["epoch"]
        assert new.health()["role"] == "active"
        log = old.proc.output()
        assert log.count("waiting to take over") >= 1 and "Traceback" not in log, log
        assert "never retrieved" not in log, log

        # Every event once, rows equal to a fresh rebuild.
        create_read_tables(own_db, REBUILD)
        await catch_up(own_db, tables=REBUILD)
        live = snapshot(own_db)
        with psycopg.connect(own_db) as conn:
            stored = conn.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()[0]
        assert len(live["history"]) == stored
        assert live == snapshot(own_db, REBUILD)

        # And it is a working standby: the new one stops cleanly, the old one takes over
        # at once (a released lease and a freed lock need no lapse).
        assert new.close() == 0
        stopped = time.monotonic()
        wait_until(lambda: old.role() == "active", timeout=BOUND)
        assert time.monotonic() - stopped < LEASE
        assert old.health()["epoch"] == taken["epoch"] + 1
        writer.create(user, "the old one again")
        wait_until(lambda: caught_up(own_db))
        assert old.batches() > committed
    finally:
        writer.close()
    assert old.close() == 0
    assert "Traceback" not in new.proc.output(), new.proc.output()
