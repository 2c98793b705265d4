"""`taskctl projector` as real processes: killed mid-batch and restarted, two at once,
and stopping with a non-zero status on an event it cannot apply."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from projections.projector import APPLICATION_NAME
from shared.events import Task
from shared.position import ZERO
from taskctl.dbinit import create_read_tables
from tests.support import TEST_SECRET, new_user
from tests.support.projection import (
    REBUILD,
    Writer,
    catch_up,
    checkpoint,
    insert_raw_event,
    max_position,
    snapshot,
    wait_until,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


class Projector:
    """One `taskctl projector` process, its output in a file; always stopped by its PID."""

    def __init__(self, url: str, log: Path, *args: str) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "ENVIRONMENT": "test",
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "LOG_LEVEL": "INFO",
        }
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskctl.cli", "projector", "--poll-interval", "0.2", *args],
            cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._out.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=10)
        finally:
            self._out.close()


@pytest.fixture
def projectors(own_db: str, tmp_path: Path) -> Iterator[list[Projector]]:
    started: list[Projector] = []
    yield started
    for p in started:
        p.kill()


def start(projectors: list[Projector], url: str, tmp_path: Path, *args: str) -> Projector:
    p = Projector(url, tmp_path / f"projector-{len(projectors)}.log", *args)
    projectors.append(p)
    return p


def in_transaction(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND xact_start IS NOT NULL",
            (APPLICATION_NAME,),
        ).fetchone()
    return bool(row and row[0])


async def rebuild(url: str) -> dict:
    create_read_tables(url, REBUILD)
    await catch_up(url, tables=REBUILD)
    return snapshot(url, REBUILD)


async def test_killed_mid_batch_and_restarted_it_equals_a_fresh_rebuild(
    own_db: str, projectors: list[Projector], tmp_path: Path
) -> None:
    writer = Writer(own_db)
    try:
        for _ in range(3):
            writer.bulk(users=10, tasks_per_user=100)
    finally:
        writer.close()
    end = max_position(own_db)

    kills = 0
    for _ in range(4):
        p = start(projectors, own_db, tmp_path, "--batch-size", "40")
        wait_until(lambda: in_transaction(own_db) or checkpoint(own_db) == end)
        if checkpoint(own_db) == end:
            break
        wait_until(lambda: in_transaction(own_db))
        p.kill()
        kills += 1
        reached = checkpoint(own_db)
        assert reached is not None and reached < end
        # the read tables stand exactly at a batch boundary (one writing transaction per
        # bulk, so notification ids count the events in the global order)
        assert reached.notification_id % 40 == 0
    assert kills >= 1

    final = start(projectors, own_db, tmp_path, "--batch-size", "40")
    wait_until(lambda: checkpoint(own_db) == end, timeout=60)
    assert final.stop() == 0
    assert snapshot(own_db) == await rebuild(own_db)


async def test_two_projector_processes_apply_every_event_once(
    own_db: str, projectors: list[Projector], tmp_path: Path
) -> None:
    first = start(projectors, own_db, tmp_path)
    wait_until(lambda: "projector active" in first.output())
    second = start(projectors, own_db, tmp_path)
    wait_until(lambda: "waiting to take over" in second.output())

    writer = Writer(own_db)
    user = new_user()
    try:
        tasks = [writer.create(user, f"Task {n}") for n in range(10)]
        wait_until(lambda: checkpoint(own_db) == max_position(own_db))
        first.kill()
        for task in tasks[:4]:
            writer.change(user, task, completed=True)
        writer.delete(user, tasks[9])
    finally:
        writer.close()

    wait_until(lambda: "projector active" in second.output())
    wait_until(lambda: checkpoint(own_db) == max_position(own_db))
    with psycopg.connect(own_db) as conn:
        assert conn.execute(
            "SELECT total, completed, pending FROM read_user_stats WHERE user_id = %s", (user,)
        ).fetchone() == (9, 4, 5)
        assert (
            conn.execute("SELECT count(*) FROM read_task_history").fetchone()
            == conn.execute("SELECT count(*) FROM tasks_events").fetchone()
        )
    assert second.stop() == 0
    assert snapshot(own_db) == await rebuild(own_db)


def test_an_event_it_cannot_apply_stops_the_process_non_zero_naming_it(
    own_db: str, projectors: list[Projector], tmp_path: Path
) -> None:
    task_id = uuid.uuid4()
    state = json.dumps({"timestamp": {"_type_": "datetime_iso", "_data_": "2025-01-01T00:00:00"},
                        "actor": "a", "request_id": "r", "description": "x"}).encode()
    bad = insert_raw_event(own_db, task_id, 7, Task.DescriptionChanged.TOPIC, state)

    p = start(projectors, own_db, tmp_path)
    status = p.proc.wait(timeout=20)

    assert status != 0
    line = next(line for line in p.output().splitlines() if "projector stopped" in line)
    for part in (f"position={bad.notification_id}", f"task_id={task_id}", "version=7",
                 "topic=TaskDescriptionChanged"):
        assert part in line
    assert checkpoint(own_db) == ZERO


def test_restarting_after_a_kill_resumes_without_reapplying(
    own_db: str, projectors: list[Projector], tmp_path: Path
) -> None:
    writer = Writer(own_db)
    user = new_user()
    try:
        writer.create(user, "One")
        p = start(projectors, own_db, tmp_path)
        wait_until(lambda: checkpoint(own_db) == max_position(own_db))
        p.kill()
        writer.create(user, "Two")
    finally:
        writer.close()
    start(projectors, own_db, tmp_path)
    wait_until(lambda: checkpoint(own_db) == max_position(own_db))
    with psycopg.connect(own_db) as conn:
        assert conn.execute(
            "SELECT total FROM read_user_stats WHERE user_id = %s", (user,)
        ).fetchone() == (2,)
