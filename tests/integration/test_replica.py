"""The query API on a real streaming replica (`tests/support/replica.py`): a primary and a
hot standby of our own on loopback ports, the replica applying every commit 300 ms
after the primary made it (`recovery_min_apply_delay`), so that replica lag is real.

The command API and the projector use the primary (`DATABASE_URL`); the query API
reads the replica (`READ_DATABASE_URL`) and asks the primary for each user's latest
position (`query_api.reader.OwnPositions`). Proves, on the replica:

- read-your-own-writes with no header: a read sent right after a command reflects it
  (the replica did not have it yet: checked directly), having waited for the replica;
- `X-Min-Position`: another user's read waits for the position it names;
- another user's task is a 403 as soon as its create is acknowledged: its latest event,
  looked up on the primary, is waited for on the replica;
- a hot standby delivers no NOTIFY: the position watch does not LISTEN
  (`watch.listening` False) and re-checks on a timer, and waits still end promptly;
- every list, task, task history, feed and stats answer equals the user's events up
  to the answer's `meta.position`, folded here from the primary's event store;
- `/api/ready` turns 503 once the replica (replay paused) lags more than
  `READY_MAX_LAG_SECONDS` behind the primary, and 200 again once it catches up; reads
  meanwhile answer `stale: true` within `READ_WAIT_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from command_api.app import create_app as create_command_app
from projections.projector import run as run_projector
from query_api.app import create_app as create_query_app
from shared.position import Position
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.query import codec_for
from tests.support.replica import ReplicaSet

APPLY_DELAY_MS = 300
_PRIMARY: list[str] = []  # whose sealing key opens the positions (the replica has it too)


def decode(token: str) -> Position:
    return codec_for(_PRIMARY[0]).decode(token)


def encode(position: Position) -> str:
    token = codec_for(_PRIMARY[0]).encode(position)
    assert token is not None
    return token

READ_WAIT = 3.0  # READ_WAIT_TIMEOUT, well above the replica's lag
MAX_LAG = 1.5  # READY_MAX_LAG_SECONDS


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicaSet]:
    with ReplicaSet() as rs:
        init_database(Settings(environment="test", database_url=rs.primary_url(),
                               better_auth_secret=TEST_SECRET))
        _PRIMARY[:] = [rs.primary_url()]
        rs.wait_replayed()
        rs.set_apply_delay(APPLY_DELAY_MS)
        yield rs


@pytest.fixture(scope="module")
async def projector(pair: ReplicaSet) -> AsyncIterator[asyncio.Task[None]]:
    """The real projector on the primary, in this event loop (the tests' HTTP calls go
    to threads, so it keeps running while they wait)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_projector(pair.primary_url(), stop=stop, poll_interval=5))
    yield task
    stop.set()
    await asyncio.wait_for(task, 10)


@pytest.fixture(scope="module")
def commands(pair: ReplicaSet) -> Iterator[TestClient]:
    settings = Settings(environment="test", database_url=pair.primary_url(),
                        better_auth_secret=TEST_SECRET)
    with TestClient(create_command_app(settings), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def queries(pair: ReplicaSet) -> Iterator[TestClient]:
    settings = Settings(environment="test", database_url=pair.primary_url(),
                        read_database_url=pair.replica_url(), better_auth_secret=TEST_SECRET,
                        read_wait_timeout=READ_WAIT, ready_max_lag_seconds=MAX_LAG)
    with TestClient(create_query_app(settings), raise_server_exceptions=False) as client:
        yield client


async def off_loop(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking call in a thread: the projector runs in this loop meanwhile."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def command(client: TestClient, method: str, path: str, user: str, body: Any = None
            ) -> tuple[dict[str, Any] | None, Position]:
    response = client.request(method, path, json=body, headers=bearer(user))
    assert response.status_code in (200, 201, 204), response.text
    data = response.json()["data"] if response.status_code != 204 else None
    return data, decode(response.headers["X-Position"])


def timed_get(client: TestClient, path: str, user: str, **headers: str
              ) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    response = client.get(path, headers={**bearer(user), **headers})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    return response.json(), elapsed


def on_replica(pair: ReplicaSet, task_id: str) -> bool:
    with psycopg.connect(pair.replica_url()) as conn:
        return conn.execute("SELECT 1 FROM read_tasks WHERE task_id = %s",
                            (task_id,)).fetchone() is not None


def events_of(pair: ReplicaSet, user: str) -> list[tuple[Position, str, int, str]]:
    """The user's events from the primary's event store, in the global order:
    (position, task id, version, topic)."""
    with psycopg.connect(pair.primary_url()) as conn:
        rows = conn.execute(
            "SELECT e.tx_id::text, e.notification_id, e.originator_id::text,"
            " e.originator_version, e.topic FROM tasks_events e"
            " WHERE e.originator_id IN (SELECT originator_id FROM tasks_events"
            "   WHERE topic = 'TaskCreated'"
            "   AND convert_from(state, 'UTF8')::jsonb ->> 'owner' = %s)"
            " ORDER BY e.tx_id, e.notification_id", (user,)).fetchall()
    return [(Position(int(r[0]), r[1]), r[2], r[3], r[4]) for r in rows]


def expected_at(events: list[tuple[Position, str, int, str]], position: Position
                ) -> dict[str, Any]:
    """What the read tables must show for the user at `position`, folded here."""
    live: dict[str, bool] = {}  # task id: completed
    versions: dict[str, int] = {}
    feed = 0
    for at, task_id, version, topic in events:
        if at > position:
            break
        feed += 1
        versions[task_id] = version
        if topic == "TaskCreated":
            live[task_id] = False
        elif topic == "TaskDeleted":
            live.pop(task_id, None)
        elif topic in ("TaskCompleted", "TaskReopened"):
            live[task_id] = topic == "TaskCompleted"
    done = sum(live.values())
    return {"ids": set(live), "versions": versions, "feed": feed,
            "stats": {"total": len(live), "completed": done, "pending": len(live) - done}}


async def test_reads_reflect_own_writes_by_default_despite_replica_lag(
    pair: ReplicaSet, projector: asyncio.Task[None], commands: TestClient, queries: TestClient
):
    user = new_user()
    waits = []
    ids: list[str] = []
    for i in range(5):
        task, position = await off_loop(command, commands, "POST", "/api/tasks", user,
                                        {"title": f"on the replica {i}"})
        assert task is not None
        acknowledged = time.monotonic()
        ids.append(task["id"])
        # The replica has not applied it yet (the projection of it, 300 ms later)...
        assert not await off_loop(on_replica, pair, task["id"])
        # ... and yet a read sent now, with no header, shows it: it waited.
        body, _ = await off_loop(timed_get, queries, f"/api/tasks/{task['id']}", user)
        waited = time.monotonic() - acknowledged
        assert body["data"] == task and body["meta"]["stale"] is False
        assert decode(body["meta"]["position"]) >= position
        waits.append(waited)
    # The wait is the replica's lag (300 ms after the projector's commit), not the
    # read's timeout nor a 1 s timer.
    assert min(waits) >= APPLY_DELAY_MS / 1000 * 0.8, waits
    assert statistics.median(waits) < APPLY_DELAY_MS / 1000 + 0.5, waits
    assert max(waits) < READ_WAIT, waits
    listed, _ = await off_loop(timed_get, queries, "/api/tasks", user)
    assert [t["id"] for t in listed["data"]] == ids[::-1]
    await off_loop(command, commands, "PATCH", f"/api/tasks/{ids[0]}", user, {"completed": True})
    stats, _ = await off_loop(timed_get, queries, "/api/stats", user)
    assert stats["data"] == {"total": 5, "completed": 1, "pending": 4}
    await off_loop(command, commands, "DELETE", f"/api/tasks/{ids[1]}", user)
    gone = await off_loop(queries.get, f"/api/tasks/{ids[1]}", headers=bearer(user))
    assert gone.status_code == 404 and gone.json()["meta"]["stale"] is False
    print(f"\nreplica reads after each write waited {[round(w, 3) for w in waits]} s"
          f" (recovery_min_apply_delay {APPLY_DELAY_MS} ms)")
    assert not projector.done()


async def test_x_min_position_waits_for_another_users_write_on_the_replica(
    pair: ReplicaSet, projector: asyncio.Task[None], commands: TestClient, queries: TestClient
):
    writer, reader = new_user(), new_user()
    await off_loop(command, commands, "POST", "/api/tasks", writer, {"title": "first"})
    _, position = await off_loop(command, commands, "POST", "/api/tasks", writer,
                                 {"title": "passed along"})
    # Without the header the reader has nothing of its own to wait for: the replica's
    # answer at once, short of the writer's position.
    now, quick = await off_loop(timed_get, queries, "/api/stats", reader)
    assert now["meta"]["stale"] is False and decode(now["meta"]["position"]) < position
    # With it, the read waits until the replica has the writer's position.
    token = encode(position)
    waited_for, slow = await off_loop(timed_get, queries, "/api/stats", reader,
                                      **{"X-Min-Position": token})
    assert waited_for["meta"]["stale"] is False
    assert decode(waited_for["meta"]["position"]) >= position
    assert waited_for["data"] == {"total": 0, "completed": 0, "pending": 0}
    assert quick < slow < READ_WAIT, (quick, slow)
    assert not projector.done()


async def test_another_users_fresh_task_is_403_on_the_replica_too(
    pair: ReplicaSet, projector: asyncio.Task[None], commands: TestClient, queries: TestClient
):
    owner, other = new_user(), new_user()
    for i in range(3):
        task, _ = await off_loop(command, commands, "POST", "/api/tasks", owner,
                                 {"title": f"someone else's {i}"})
        assert task is not None
        assert not await off_loop(on_replica, pair, task["id"])  # not there yet
        started = time.monotonic()
        response = await off_loop(queries.get, f"/api/tasks/{task['id']}", headers=bearer(other))
        waited = time.monotonic() - started
        assert response.status_code == 403, response.text
        assert response.json()["meta"]["stale"] is False
        assert waited < READ_WAIT, waited
    assert not projector.done()


async def test_a_hot_standby_gives_no_notify_so_the_watch_rechecks_on_a_timer(
    pair: ReplicaSet, projector: asyncio.Task[None], commands: TestClient, queries: TestClient
):
    user = new_user()
    await off_loop(command, commands, "POST", "/api/tasks", user, {"title": "wake the watch"})
    await off_loop(timed_get, queries, "/api/tasks", user)
    watch = queries.app.state.read_side.watch
    assert watch is not None and watch._task is not None and not watch._task.done()
    assert watch.listening is False  # LISTEN failed on the standby: the timer path
    ready = await off_loop(queries.get, "/api/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["data"]["listening"] is False
    # Waits on the timer still end as soon as the replica has the position.
    waits = []
    for i in range(3):
        await off_loop(command, commands, "POST", "/api/tasks", user, {"title": f"timer {i}"})
        acknowledged = time.monotonic()
        body, _ = await off_loop(timed_get, queries, "/api/tasks", user)
        assert len(body["data"]) == 2 + i and body["meta"]["stale"] is False
        waits.append(time.monotonic() - acknowledged)
    assert statistics.median(waits) < APPLY_DELAY_MS / 1000 + 0.5, waits


async def test_every_answer_equals_the_users_events_up_to_its_position(
    pair: ReplicaSet, projector: asyncio.Task[None], commands: TestClient, queries: TestClient
):
    user = new_user()
    ids = []
    for i in range(6):
        task, _ = await off_loop(command, commands, "POST", "/api/tasks", user, {"title": f"t{i}"})
        ids.append(task["id"])
    await off_loop(command, commands, "PATCH", f"/api/tasks/{ids[0]}/complete", user)
    await off_loop(command, commands, "PATCH", f"/api/tasks/{ids[2]}", user, {"title": "t2 again"})
    await off_loop(command, commands, "DELETE", f"/api/tasks/{ids[3]}", user)
    checked = 0
    # Reads both right after a write (waiting) and while nothing is pending.
    for step in range(4):
        if step % 2 == 0:
            await off_loop(command, commands, "PATCH", f"/api/tasks/{ids[1]}/complete", user)
        answers = {}
        for path in ("/api/tasks", "/api/stats", "/api/history?limit=1000",
                     f"/api/tasks/{ids[1]}/history", f"/api/tasks/{ids[1]}"):
            body, _ = await off_loop(timed_get, queries, path, user)
            assert body["meta"]["stale"] is False, (path, body["meta"])
            answers[path] = body
        events = await off_loop(events_of, pair, user)
        for path, body in answers.items():
            want = expected_at(events, decode(body["meta"]["position"]))
            data = body["data"]
            if path == "/api/tasks":
                assert {t["id"] for t in data} == want["ids"]
                assert {t["id"]: t["version"] for t in data} == {
                    i: want["versions"][i] for i in want["ids"]}
            elif path == "/api/stats":
                assert data == want["stats"]
            elif path.startswith("/api/history"):
                assert len(data) == want["feed"]
            elif path.endswith("/history"):
                assert [h["version"] for h in data] == list(range(1, want["versions"][ids[1]] + 1))
            else:
                assert data["version"] == want["versions"][ids[1]]
            checked += 1
    assert checked == 20
    assert not projector.done()


async def test_ready_turns_503_while_the_replica_lags_past_the_bound(
    pair: ReplicaSet, projector: asyncio.Task[None], commands: TestClient, queries: TestClient
):
    user = new_user()
    ready = await off_loop(queries.get, "/api/ready")
    assert ready.status_code == 200, ready.text
    pair.replica.execute("SELECT pg_wal_replay_pause()")
    try:
        task, _ = await off_loop(command, commands, "POST", "/api/tasks", user, {"title": "paused"})
        # The projector keeps up on the primary; the replica does not replay.
        started = time.monotonic()
        stale = await off_loop(queries.get, f"/api/tasks/{task['id']}", headers=bearer(user))
        assert stale.status_code == 404 and stale.json()["meta"]["stale"] is True
        assert READ_WAIT * 0.9 <= time.monotonic() - started < READ_WAIT + 2
        deadline = time.monotonic() + MAX_LAG + 5
        while True:
            ready = await off_loop(queries.get, "/api/ready")
            if ready.status_code == 503 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert ready.status_code == 503, ready.text
        body = ready.json()
        assert body["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert body["error"]["details"]["lag_seconds"] > MAX_LAG
    finally:
        pair.replica.execute("SELECT pg_wal_replay_resume()")
    deadline = time.monotonic() + 10
    while (ready := await off_loop(queries.get, "/api/ready")).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        await asyncio.sleep(0.1)
    body, _ = await off_loop(timed_get, queries, f"/api/tasks/{task['id']}", user)
    assert body["meta"]["stale"] is False
