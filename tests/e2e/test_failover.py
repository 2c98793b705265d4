"""A failover drill: the primary dies under keyed writes, the replica is promoted, and
the real processes move to it by themselves.

A primary and a streaming replica of our own (`tests/support/replica.py`), the real
`taskctl command-api`, `query-api` and `projector`, all given the same libpq multi-host
URL: `postgresql://...@127.0.0.1:P,127.0.0.1:R/tasks?target_session_attrs=read-write`
(asyncpg tries the hosts in order and keeps the first that accepts writes, so no
process is told about the failover). The query API reads with
`target_session_attrs=prefer-standby`: the replica while there is one.

Writers create tasks and toggle some, each request with its own Idempotency-Key; a
reader lists and counts. Then, mid-load, the primary is lost: SIGKILL of its postmaster
and of every process it had (a machine gone: nothing more leaves it), and
`pg_ctl promote` on the replica.

With synchronous replication (the replica confirms each commit's WAL before the
primary acknowledges it), proves: every acknowledged write is on the promoted server;
retrying every request with its key settles each exactly once (one task per create
key, one event per toggle key); the projector resumed where the replicated
checkpoint was, skipping and repeating nothing (its read tables equal an independent
fold of the events, `projections.verify`, one history row per event); each writer's
acknowledged positions only grow, and so do the positions every reader saw.

The same drill with asynchronous replication measures what it loses: the walsender
is stopped (SIGSTOP) for a moment before the crash, as a slow network or a busy
replica holds WAL back, so writes acknowledged in that moment never reach the
replica. The synchronous drill runs with the same stall and loses nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import psycopg
import pytest

from projections.verify import Fold, compare, summarise
from shared.catalog import LIVE
from shared.position import Position
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.process import Proc, free_port
from tests.support.query import codec_for
from tests.support.replica import ReplicaSet

pytestmark = pytest.mark.slow

TASKCTL = str(Path(sys.executable).with_name("taskctl"))
WRITERS = 3
LOAD_BEFORE, STALL, LOAD_AFTER = 2.5, 1.0, 3.0
REQUEST_TIMEOUT = 10.0


_KEY_FROM: list[str] = []  # the database whose sealing key opens the drill's positions


def decode(token: str) -> Position:
    return codec_for(_KEY_FROM[0]).decode(token)


def encode(position: Position) -> str:
    token = codec_for(_KEY_FROM[0]).encode(position)
    assert token is not None
    return token


def multi_host(pair: ReplicaSet, attrs: str) -> str:
    return (f"postgresql://postgres@127.0.0.1:{pair.primary.port},127.0.0.1:{pair.replica.port}"
            f"/{pair.database}?target_session_attrs={attrs}")


def env_for(pair: ReplicaSet) -> dict[str, str]:
    return {**os.environ, "ENVIRONMENT": "test", "BETTER_AUTH_SECRET": TEST_SECRET,
            "DATABASE_URL": multi_host(pair, "read-write"), "DB_CONNECT_TIMEOUT": "2",
            "LOG_LEVEL": "WARNING", "METRICS_PORT": "0", "READ_WAIT_TIMEOUT": "3"}


def serve(name: str, env: dict[str, str], tmp: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc([TASKCTL, name, "--host", "127.0.0.1", "--port", str(port)], tmp / f"{name}.log",
                env=env)
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class Drill:
    """What the clients saw."""

    user: str = field(default_factory=new_user)
    creates: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # key: status, id
    toggles: dict[str, tuple[str, int, str | None]] = field(default_factory=dict)  # key: task, status, version
    acknowledged: list[list[Position]] = field(default_factory=lambda: [[] for _ in range(WRITERS)])
    read_positions: list[Position] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    acked_during_stall: int = 0  # writes sent while WAL was held back, acknowledged
    stalled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


def write_load(drill: Drill, base: str, n: int, stop: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        i = 0
        while not stop.is_set():
            key = f"drill-{n}-{i}"
            i += 1
            stalled = drill.stalled.is_set()  # sent while WAL was held back
            try:
                r = client.post("/api/tasks", json={"title": key},
                                headers={**bearer(drill.user), "Idempotency-Key": key})
            except httpx.TransportError as e:
                with drill.lock:
                    drill.errors.append(f"create: {type(e).__name__}")
                    drill.creates[key] = (0, None)
                continue
            task_id = r.json()["data"]["id"] if r.status_code == 201 else None
            with drill.lock:
                drill.statuses[f"create {r.status_code}"] += 1
                drill.creates[key] = (r.status_code, task_id)
                if r.status_code == 201:
                    drill.acknowledged[n].append(decode(r.headers["X-Position"]))
                    drill.acked_during_stall += stalled
            if task_id and i % 2 == 0:
                toggle = f"{key}-toggle"
                stalled = drill.stalled.is_set()
                try:
                    t = client.patch(f"/api/tasks/{task_id}/complete",
                                     headers={**bearer(drill.user), "Idempotency-Key": toggle})
                except httpx.TransportError as e:
                    with drill.lock:
                        drill.errors.append(f"toggle: {type(e).__name__}")
                        drill.toggles[toggle] = (task_id, 0, None)
                    continue
                with drill.lock:
                    drill.statuses[f"toggle {t.status_code}"] += 1
                    drill.toggles[toggle] = (task_id, t.status_code,
                                             t.json()["data"]["version"] if t.status_code == 200 else None)
                    if t.status_code == 200:
                        drill.acknowledged[n].append(decode(t.headers["X-Position"]))
                        drill.acked_during_stall += stalled


def read_load(drill: Drill, base: str, stop: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        while not stop.is_set():
            for path in ("/api/stats", "/api/tasks?limit=5"):
                try:
                    r = client.get(path, headers=bearer(drill.user))
                except httpx.TransportError as e:
                    with drill.lock:
                        drill.errors.append(f"read: {type(e).__name__}")
                    continue
                with drill.lock:
                    drill.statuses[f"read {r.status_code}"] += 1
                    if r.status_code == 200:
                        drill.read_positions.append(decode(r.json()["meta"]["position"]))
            time.sleep(0.02)


def walsender_pid(pair: ReplicaSet) -> int:
    (pid,), = pair.primary.execute(
        "SELECT pid FROM pg_stat_replication WHERE application_name = 'replica'")
    return int(pid)


def wait_for(check, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - started


def created_ok(base: str, user: str) -> bool:
    try:
        r = httpx.post(f"{base}/api/tasks", json={"title": "after failover"},
                       headers=bearer(user), timeout=5)
    except httpx.TransportError:
        return False
    return r.status_code == 201


def stored(url: str, user: str) -> tuple[set[str], Counter[str], set[tuple[str, int]]]:
    """The user's task ids, toggle events per task, and (task, version) of every event."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT originator_id::text, originator_version, topic FROM tasks_events"
            " WHERE originator_id IN (SELECT originator_id FROM tasks_events"
            "  WHERE topic = 'TaskCreated' AND convert_from(state, 'UTF8')::jsonb ->> 'owner' = %s)",
            (user,)).fetchall()
    tasks = {r[0] for r in rows if r[2] == "TaskCreated"}
    toggled = Counter(r[0] for r in rows if r[2] in ("TaskCompleted", "TaskReopened"))
    return tasks, toggled, {(r[0], r[1]) for r in rows}


async def fold_differences(url: str) -> tuple[dict[str, list[str]], Position, int, int]:
    """The read tables against an independent fold of every event up to the checkpoint;
    the checkpoint, the number of events and of history rows."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT tx_id::text, position FROM projection_checkpoints WHERE projection = 'task_views'")
        checkpoint = Position(int(row[0]), row[1])
        fold = Fold()
        events = await fold.advance(conn, checkpoint)
        assert not fold.problems, fold.problems[:5]
        actual = await summarise(conn, LIVE)
        history_rows = await conn.fetchval("SELECT count(*) FROM read_task_history")
        return compare(fold.expected(), actual), checkpoint, events, history_rows
    finally:
        await conn.close()


@pytest.fixture
def synchronous_pair() -> Iterator[ReplicaSet]:
    with ReplicaSet(synchronous=True) as pair:
        yield pair


@pytest.fixture
def asynchronous_pair() -> Iterator[ReplicaSet]:
    with ReplicaSet(synchronous=False) as pair:
        yield pair


def run_drill(pair: ReplicaSet, tmp: Path, *, stall: float) -> tuple[Drill, dict[str, float], dict[str, str]]:
    """The load, the crash (after stopping the walsender for `stall` seconds), the
    promotion, more load; then every key retried. What the clients saw, timings,
    the promoted server's URL."""
    init_database(Settings(environment="test", database_url=pair.primary_url(),
                           better_auth_secret=TEST_SECRET))
    _KEY_FROM[:] = [pair.primary_url()]
    codec_for(pair.primary_url())  # the key, read before the primary goes (it replicates)
    pair.wait_replayed()
    env = env_for(pair)
    command, command_url = serve("command-api", env, tmp)
    query, query_url = serve("query-api", {**env, "READ_DATABASE_URL": multi_host(pair, "prefer-standby")},
                             tmp)
    projector = Proc([TASKCTL, "projector", "--poll-interval", "0.2"], tmp / "projector.log", env=env)
    procs = [command, query, projector]
    drill = Drill()
    timings: dict[str, float] = {}
    try:
        command.wait_http(f"{command_url}/api/ready", 30)
        query.wait_http(f"{query_url}/api/ready", 30)
        stop = threading.Event()
        threads = [threading.Thread(target=write_load, args=(drill, command_url, n, stop))
                   for n in range(WRITERS)]
        threads.append(threading.Thread(target=read_load, args=(drill, query_url, stop)))
        for t in threads:
            t.start()
        try:
            time.sleep(LOAD_BEFORE)
            if stall:
                sender = walsender_pid(pair)
                os.kill(sender, signal.SIGSTOP)  # WAL stops leaving the primary
                drill.stalled.set()
                time.sleep(stall)
            crashed = time.monotonic()
            pair.primary.kill(children=True)
            drill.stalled.clear()
            timings["promote"] = pair.replica.promote()
            wait_for(lambda: created_ok(command_url, new_user()), 30,
                     "a write on the promoted server")
            timings["writes back after"] = time.monotonic() - crashed
            time.sleep(LOAD_AFTER)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert command.proc.poll() is None and query.proc.poll() is None, (
            command.output()[-2000:], query.output()[-2000:])

        # Every request retried with its key: each settles once, on the promoted server.
        settled: dict[str, str] = {}
        with httpx.Client(base_url=command_url, timeout=REQUEST_TIMEOUT) as client:
            for key in list(drill.creates):
                r = client.post("/api/tasks", json={"title": key},
                                headers={**bearer(drill.user), "Idempotency-Key": key})
                assert r.status_code == 201, r.text
                settled[key] = r.json()["data"]["id"]
            for key, (task_id, status, version) in list(drill.toggles.items()):
                r = client.patch(f"/api/tasks/{task_id}/complete",
                                 headers={**bearer(drill.user), "Idempotency-Key": key})
                assert r.status_code in (200, 404), r.text  # 404: its task's create was lost
                if status == 200 and r.status_code == 200 and r.json()["data"]["version"] != version:
                    drill.errors.append(f"toggle {key} settled twice")
            last = client.get("/api/health")
            assert last.status_code == 200
        drill.settled = settled  # type: ignore[attr-defined]
        # The projector catches up on the promoted server (or stops on an event it
        # cannot apply: it never skips one).
        promoted = pair.replica_url()
        wait_for(lambda: projector.proc.poll() is not None or _caught_up(promoted), 30,
                 "the projector catching up")
        drill.projector_exit = projector.proc.poll()  # type: ignore[attr-defined]
        drill.projector_log = projector.output()  # type: ignore[attr-defined]
        final = httpx.get(f"{query_url}/api/stats", headers={
            **bearer(drill.user),
            "X-Min-Position": encode(max(p for w in drill.acknowledged for p in w))}, timeout=10)
        assert final.status_code == 200, final.text
        drill.final = final.json()  # type: ignore[attr-defined]
        for p in (command, query):
            assert "unhandled error" not in p.output().lower(), p.output()[-3000:]
        return drill, timings, {"promoted": promoted}
    finally:
        for p in procs:
            p.stop()


def _caught_up(url: str) -> bool:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT (tx_id, position) FROM projection_checkpoints"
            "  WHERE projection = 'task_views')"
            " >= (SELECT (tx_id, notification_id) FROM tasks_events"
            "  ORDER BY tx_id DESC, notification_id DESC LIMIT 1)").fetchone()
    return bool(row and row[0])


def acknowledged_missing(drill: Drill, url: str) -> tuple[list[str], list[str]]:
    """Acknowledged creates and toggles that the promoted server does not have."""
    tasks, _, events = stored(url, drill.user)
    lost_creates = [k for k, (s, tid) in drill.creates.items() if s == 201 and tid not in tasks]
    lost_toggles = [k for k, (tid, s, v) in drill.toggles.items()
                    if s == 200 and (tid, v) not in events]
    return lost_creates, lost_toggles


def regressions(positions: list[Position]) -> int:
    return sum(1 for a, b in zip(positions, positions[1:]) if b < a)


def test_failover_with_synchronous_replication_loses_no_acknowledged_write(
    synchronous_pair: ReplicaSet, tmp_path: Path
):
    pair = synchronous_pair
    drill, timings, where = run_drill(pair, tmp_path, stall=STALL)
    url = where["promoted"]
    acked_creates = sum(1 for s, _ in drill.creates.values() if s == 201)
    acked_toggles = sum(1 for _, s, _ in drill.toggles.values() if s == 200)
    failed = sum(1 for s, _ in drill.creates.values() if s != 201)
    print(f"\nfailover (synchronous): {acked_creates} creates and {acked_toggles} toggles"
          f" acknowledged, {failed} creates failed during it, statuses {dict(drill.statuses)};"
          f" promote {timings['promote']:.2f}s, writes back {timings['writes back after']:.2f}s"
          f" after the crash; {drill.acked_during_stall} acknowledged while WAL was held back")

    # Nothing the clients were told was written is missing.
    assert acknowledged_missing(drill, url) == ([], [])
    # While the replica could not confirm, nothing was acknowledged (commits waited).
    assert drill.acked_during_stall == 0
    # Every key settled exactly once: one task per create key, one event per toggle key.
    tasks, toggled, _ = stored(url, drill.user)
    settled = drill.settled  # type: ignore[attr-defined]
    assert len(set(settled.values())) == len(settled) and set(settled.values()) <= tasks
    for key, (status, task_id) in drill.creates.items():
        if status == 201:
            assert settled[key] == task_id, key
    per_task = Counter(tid for tid, _, _ in drill.toggles.values())
    assert {t: toggled[t] for t in per_task} == dict(per_task)
    assert not [e for e in drill.errors if "settled twice" in e], drill.errors
    # The only other tasks are the probes' (other users): this user's are the keys'.
    assert tasks == set(settled.values())
    # The projector resumed from the replicated checkpoint: its tables equal a fold of
    # every event, one history row per event (nothing skipped, nothing repeated).
    assert drill.projector_exit is None, drill.projector_log[-3000:]  # type: ignore[attr-defined]
    differences, checkpoint, events, history_rows = asyncio.run(fold_differences(url))
    assert differences == {}, differences
    assert history_rows == events
    # Positions only grow for every client.
    assert all(regressions(w) == 0 and len(set(w)) == len(w) for w in drill.acknowledged)
    assert regressions(drill.read_positions) == 0
    final = drill.final  # type: ignore[attr-defined]
    assert final["meta"]["stale"] is False and final["data"]["total"] == len(settled)
    assert drill.statuses["create 201"] > 20 and drill.statuses["read 200"] > 5
    allowed = {"create 201", "create 503", "toggle 200", "toggle 503", "read 200", "read 503"}
    assert set(drill.statuses) <= allowed, drill.statuses
    assert not drill.errors, drill.errors[:5]


def test_the_same_failover_with_asynchronous_replication_loses_acknowledged_writes(
    asynchronous_pair: ReplicaSet, tmp_path: Path
):
    pair = asynchronous_pair
    drill, timings, where = run_drill(pair, tmp_path, stall=STALL)
    url = where["promoted"]
    lost_creates, lost_toggles = acknowledged_missing(drill, url)
    acked = sum(1 for s, _ in drill.creates.values() if s == 201) + sum(
        1 for _, s, _ in drill.toggles.values() if s == 200)
    back = [regressions(w) for w in drill.acknowledged]
    print(f"\nfailover (asynchronous): {acked} writes acknowledged, {drill.acked_during_stall}"
          f" of them while WAL was held back {STALL}s; lost: {len(lost_creates)} creates,"
          f" {len(lost_toggles)} toggles; writers' positions went back {back} times;"
          f" promote {timings['promote']:.2f}s, writes back {timings['writes back after']:.2f}s")
    # Asynchronous: the primary acknowledged while the replica had not received the WAL,
    # and the promoted replica never had those writes.
    assert drill.acked_during_stall > 0
    assert len(lost_creates) + len(lost_toggles) > 0
    assert len(lost_creates) + len(lost_toggles) <= drill.acked_during_stall + WRITERS * 2
    # Nothing was written on top of a lost write, although command APIs had cached tasks
    # as they saved them on the old primary: the store appends an event only after its
    # predecessor (`command_api.store`), so a stale copy's save is a conflict and the
    # command decides again on what the promoted server holds. The projector keeps
    # going, and the read tables agree with the promoted server (which lost the same
    # writes). (Before: 141 events with no version 1 behind them, and the projector
    # stopped on the first.)
    orphans = orphan_events(url)
    assert orphans == []
    assert drill.projector_exit is None, drill.projector_log  # type: ignore[attr-defined]
    differences, _, events, history_rows = asyncio.run(fold_differences(url))
    assert differences == {} and history_rows == events
    print(f"failover (asynchronous): events written on top of lost ones: {len(orphans)};"
          f" projector {'running' if drill.projector_exit is None else 'stopped on one'}")  # type: ignore[attr-defined]


def orphan_events(url: str) -> list[tuple[Position, str, int]]:
    """Events whose task has no version 1 on this server (written on top of lost ones)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT e.tx_id::text, e.notification_id, e.originator_id::text, e.originator_version"
            " FROM tasks_events e WHERE NOT EXISTS (SELECT 1 FROM tasks_events c"
            "  WHERE c.originator_id = e.originator_id AND c.originator_version = 1)").fetchall()
    return [(Position(int(r[0]), r[1]), r[2], r[3]) for r in rows]
