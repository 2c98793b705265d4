"""The real `taskctl projector`, SIGKILLed at random moments while writes continue.

A writer thread keeps issuing commands through the command executor (creates, renames,
completions, reopenings, description changes, deletions, for several users) for a
bounded time; meanwhile the projector process is killed with SIGKILL and restarted,
4-6 times (CHAOS_SEED, default fixed): each one is killed at a random instant (up to
0.5 s) after it has shown it is applying events (its checkpoint moved), so kills land
mid-batch as well as between batches. After
the writes stop and the last projector catches up, the read tables must equal a fresh
rebuild from the first event, row for row, and hold every event once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from uuid import UUID

import psycopg

from shared.position import ZERO
from taskctl.dbinit import create_read_tables
from tests.support import TEST_SECRET, new_user
from tests.support.projection import (
    REBUILD,
    Writer,
    catch_up,
    checkpoint,
    max_position,
    snapshot,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("CHAOS_SEED", "20240607"))
WRITE_SECONDS = float(os.environ.get("CHAOS_SECONDS", "8"))


class Projector:
    """One `taskctl projector` process; stopped by its own PID."""

    def __init__(self, url: str, log: Path) -> None:
        env = {**os.environ, "DATABASE_URL": url, "ENVIRONMENT": "test",
               "BETTER_AUTH_SECRET": TEST_SECRET, "LOG_LEVEL": "WARNING"}
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "taskctl.cli", "projector", "--poll-interval", "0.2",
                 "--batch-size", "50"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


def write_until(url: str, stop: threading.Event, rng: random.Random, done: list[int],
                errors: list[BaseException]) -> None:
    """Commands as the API issues them, for a few users, until `stop`."""
    writer = Writer(url)
    users = [new_user() for _ in range(4)]
    live: dict[str, list[UUID]] = {u: [] for u in users}
    try:
        while not stop.is_set():
            user = rng.choice(users)
            tasks = live[user]
            roll = rng.random()
            if not tasks or roll < 0.35:
                tasks.append(writer.create(user, f"task {done[0]}", rng.choice([None, "about"])))
            elif roll < 0.55:
                writer.change(user, rng.choice(tasks), title=f"renamed {done[0]}")
            elif roll < 0.75:
                writer.change(user, rng.choice(tasks), completed=rng.random() < 0.6)
            elif roll < 0.88:
                writer.change(user, rng.choice(tasks), description=rng.choice([None, f"d{done[0]}"]))
            else:
                writer.delete(user, tasks.pop(rng.randrange(len(tasks))))
            done[0] += 1
    except BaseException as e:  # reported by the test
        errors.append(e)
    finally:
        writer.close()


async def test_projector_killed_at_random_moments_while_writes_continue_equals_a_rebuild(
    own_db: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    kills = rng.randint(4, 6)

    stop, done, errors = threading.Event(), [0], []
    writing = threading.Thread(
        target=write_until, args=(own_db, stop, random.Random(SEED + 1), done, errors)
    )
    started = time.monotonic()
    projector = Projector(own_db, tmp_path / "projector-0.log")
    writing.start()
    killed_at: list[tuple[float, int, int | None]] = []
    try:
        for n in range(1, kills + 1):
            # Each projector first shows it is working (its checkpoint moves past the last
            # one), then dies at a random instant of its work: mid-batch or between batches.
            before = checkpoint(own_db)
            wait_until(lambda: (checkpoint(own_db) or ZERO) > (before or ZERO), timeout=30)
            time.sleep(rng.uniform(0.0, 0.5))
            projector.kill()
            at = checkpoint(own_db)
            killed_at.append((round(time.monotonic() - started, 2), done[0], at and at.notification_id))
            projector = Projector(own_db, tmp_path / f"projector-{n}.log")
        time.sleep(max(0.5, WRITE_SECONDS - (time.monotonic() - started)))
    finally:
        stop.set()
        writing.join(timeout=30)
    assert not writing.is_alive() and not errors, errors
    end = max_position(own_db)
    try:
        wait_until(lambda: checkpoint(own_db) == end, timeout=60)
    finally:
        assert projector.stop() == 0, projector.log.read_text()

    create_read_tables(own_db, REBUILD)
    await catch_up(own_db, tables=REBUILD)
    live, rebuilt = snapshot(own_db), snapshot(own_db, REBUILD)
    print(f"\nprojector chaos: seed {SEED}, {done[0]} commands, {len(live['history'])} events,"
          f" {len(killed_at)} SIGKILLs at (s, commands so far, checkpoint event id) {killed_at}")
    assert len(killed_at) == kills and 4 <= kills <= 6
    assert done[0] >= 20, done  # writes really went on during the kills
    # every projector worked before it was killed: the checkpoint moved between kills
    assert len({k[2] for k in killed_at}) == kills, killed_at
    with psycopg.connect(own_db) as conn:
        stored = conn.execute("SELECT count(*) FROM tasks_events").fetchone()[0]
    assert len(live["history"]) == stored  # every event applied, once
    assert live == rebuilt
