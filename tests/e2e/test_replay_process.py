"""`taskctl replay` as a real process, killed with SIGKILL at random points: the live
tables stay exactly as they were, and the next run cleans up and succeeds."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from tests.support.projection import Writer, catch_up, snapshot

pytestmark = pytest.mark.slow


def start_replay(url: str, *args: str, new_session: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "taskctl.cli", "replay", *args],
        env={**os.environ, "DATABASE_URL": url},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=new_session,
    )


def rebuild_tables(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE tablename LIKE 'rebuild\\_%'").fetchall()]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def projected_history(url: str) -> dict:
    """2,000 tasks of 10 users with every event type, projected; the live tables."""
    writer = Writer(url)
    try:
        writer.bulk(users=10, tasks_per_user=200)
    finally:
        writer.close()
    asyncio.run(catch_up(url))
    return snapshot(url)


def test_sigkill_at_random_points_leaves_the_live_tables_and_the_next_run_succeeds(
    own_db: str,
) -> None:
    live = projected_history(own_db)
    rng = random.Random(os.environ.get("REPLAY_KILL_SEED", time.time_ns()))
    killed_mid_rebuild = 0

    # How long a whole run takes here (it switches to equal tables), so the kills can be
    # spread over a run rather than land after it on a fast machine.
    started = time.monotonic()
    full = start_replay(own_db, "--batch-size", "300")
    full.communicate(timeout=120)
    assert full.returncode == 0
    assert snapshot(own_db) == live
    duration = time.monotonic() - started

    # From the process start (set-up, or anywhere), then twice from when the rebuild
    # tables exist (mid-load, indexing, verifying or switching). A run that finishes
    # before its kill, or (from "rebuild") is killed only after its switch, is tried
    # again with a shorter delay.
    for anchor in ("start", "rebuild", "rebuild"):
        window = duration * 0.8
        for _ in range(4):
            proc = start_replay(own_db, "--batch-size", "300")
            if anchor == "rebuild":
                limit = time.monotonic() + 30
                while not rebuild_tables(own_db) and proc.poll() is None:
                    assert time.monotonic() < limit
                    time.sleep(0.005)
            deadline = time.monotonic() + rng.uniform(0.0, window)
            while time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.005)
            killed = proc.poll() is None
            mid_rebuild = False
            if killed:
                mid_rebuild = bool(rebuild_tables(own_db))
                killed_mid_rebuild += mid_rebuild
                helpers = children(proc.pid)  # the verification fold, once started
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            if killed:  # they die with the replay, not linger folding
                limit = time.monotonic() + 10
                while alive(helpers):
                    assert time.monotonic() < limit, f"left running: {alive(helpers)}"
                    time.sleep(0.05)
            assert snapshot(own_db) == live  # untouched (or, if it finished, rebuilt equal)
            if killed and (mid_rebuild or anchor == "start"):
                break
            window /= 2

    assert killed_mid_rebuild >= 1
    proc = start_replay(own_db, "--json")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert '"switched": true' in out
    assert snapshot(own_db) == live
    assert rebuild_tables(own_db) == []


def test_ctrl_c_mid_rebuild_says_so_without_a_traceback_and_leaves_the_live_tables(
    own_db: str,
) -> None:
    live = projected_history(own_db)
    for _ in range(5):  # a run that finishes before the signal is tried again
        # Its own process group, signalled as a whole, as a terminal's Ctrl-C does (the
        # verification fold process gets the SIGINT too).
        proc = start_replay(own_db, "--batch-size", "100", new_session=True)
        limit = time.monotonic() + 30
        while not rebuild_tables(own_db) and proc.poll() is None:
            assert time.monotonic() < limit
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue
        assert proc.returncode == 130, err
        assert "interrupted; the live tables are unchanged" in err
        assert "Traceback" not in err, err
        break
    else:
        pytest.fail("every replay finished before it could be interrupted")
    assert snapshot(own_db) == live
    done = start_replay(own_db, "--json")
    _, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert rebuild_tables(own_db) == []
