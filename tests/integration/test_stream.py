"""The live stream of task changes (`GET /api/tasks/stream`, query_api/stream.py): real
PostgreSQL, the real projector following the event store, the query API served by a
real uvicorn (a socket per stream), commands through the real command API.

What it proves: a change arrives as the read tables record it, with its position as
`id:`; another user's never; a stream resumed from an old position (Last-Event-ID or
`last_event_id`) gets every change after it once and nothing before it, also across a
replay's switch of the read tables while it is open; the caps answer 429 / 503 in the
envelope; a consumer that stops reading is dropped with a reason and the server holds
no more than its bound for it; tickets are single use and expire; an expiring token
ends its stream with an `end` event."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from command_api.app import create_app as create_command_app
from projections.projector import run as run_projector
from projections.replay import replay
from query_api.app import create_app
from query_api.stream import STREAMS_ENDED, StreamHub
from query_api.tickets import Tickets
from shared.auth import mint_token
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, PostgresServer, bearer, new_user
from tests.support.live import serve
from tests.support.query import assert_error, create, write
from tests.support.query import position_of as decode
from tests.support.sse import CLOSED, SseClient


@contextlib.contextmanager
def projector(dsn: str) -> Iterator[None]:
    """The real projector, following the event store in a thread of its own."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        started.set()
        await run_projector(dsn, stop=stop[0], poll_interval=1)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(20)
        assert not thread.is_alive(), "the projector did not stop"
        loop.close()


@pytest.fixture(scope="module")
def live_projector(database_url: str) -> Iterator[None]:
    with projector(database_url):
        yield


@contextlib.contextmanager
def query_api(settings: Settings, **changes: Any) -> Iterator[tuple[str, StreamHub]]:
    app = create_app(settings.model_copy(update=changes))
    with serve(app) as base:
        yield base, app.state.streams


@pytest.fixture(scope="module")
def api(settings: Settings, live_projector: None) -> Iterator[tuple[str, StreamHub]]:
    with query_api(settings, stream_heartbeat_seconds=0.5) as served:
        yield served


def stream(base: str, user: str | None, path: str = "/api/tasks/stream",
           token: str | None = None, **params: str) -> SseClient:
    headers = {}
    if user is not None or token is not None:
        headers["Authorization"] = f"Bearer {token or mint_token(TEST_SECRET, user)}"
    return SseClient(base + path, headers=headers, params=params).open()


def caught_up(base: str, user: str) -> None:
    response = httpx.get(f"{base}/api/tasks", headers=bearer(user))
    assert response.status_code == 200 and response.json()["meta"]["stale"] is False


def wait_until(condition: Any, timeout: float = 10, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.02)


def test_each_change_arrives_with_its_position_and_the_document_after_it(
    command_client: TestClient, api: tuple[str, StreamHub]
):
    base, _ = api
    user = new_user()
    with stream(base, user) as sse:
        assert sse.status == 200
        assert sse.response_headers["content-type"].startswith("text/event-stream")
        assert sse.response_headers["cache-control"].startswith("no-cache")
        ready = sse.next()
        assert ready.event == "ready" and ready.json()["resumed"] is False
        assert ready.id == ready.json()["position"]
        assert sse.retry == 2000

        task, created_at = create(command_client, user, "Buy milk", "two")
        (event,) = sse.take(1)
        assert event.event == "task" and event.id == created_at
        assert event.json() == task

        patched, patched_at = write(command_client, "PATCH", f"/api/tasks/{task['id']}", user,
                                    {"completed": True})
        (event,) = sse.take(1)
        assert (event.id, event.json()) == (patched_at, patched)
        assert event.json()["version"] == 2 and event.json()["completed"] is True

        _, deleted_at = write(command_client, "DELETE", f"/api/tasks/{task['id']}", user)
        (event,) = sse.take(1)
        assert event.event == "task_deleted" and event.id == deleted_at
        assert event.json() == {"id": task["id"], "user_id": user, "version": 3}
        assert decode(created_at) < decode(patched_at) < decode(deleted_at)
        # Idle: heartbeat comments (every 0.5 s here), nothing else.
        before = sse.comments
        assert sse.quiet(1.2) == []
        assert sse.comments >= before + 2


def test_another_users_changes_never_arrive(
    command_client: TestClient, api: tuple[str, StreamHub]
):
    base, _ = api
    me, other = new_user(), new_user()
    with stream(base, me) as mine, stream(base, other) as theirs:
        assert mine.next().event == theirs.next().event == "ready"
        for i in range(5):
            create(command_client, other, f"theirs {i}")
        own, _ = create(command_client, me, "mine")
        (event,) = mine.take(1)
        assert event.json()["id"] == own["id"], event  # theirs came first, and never here
        assert [e.json()["title"] for e in theirs.take(5)] == [f"theirs {i}" for i in range(5)]
        assert mine.quiet(0.5) == [] and theirs.quiet(0.1) == []


def test_the_path_contract_is_the_token_users_only(api: tuple[str, StreamHub]):
    base, _ = api
    me = new_user()
    with stream(base, me, f"/api/{me}/tasks/stream") as sse:
        assert sse.status == 200 and sse.next().event == "ready"
    with stream(base, me, f"/api/{new_user()}/tasks/stream") as sse:
        assert sse.status == 403
    response = httpx.get(f"{base}/api/{new_user()}/tasks/stream", headers=bearer(me))
    assert_error(response, 403, "FORBIDDEN")


def test_refusals_come_in_the_envelope(api: tuple[str, StreamHub]):
    base, _ = api
    me = new_user()
    assert_error(httpx.get(f"{base}/api/tasks/stream"), 401, "UNAUTHORIZED")
    error = assert_error(httpx.get(f"{base}/api/tasks/stream", headers=bearer(me),
                                   params={"last_event_id": "p9.nope"}), 422, "VALIDATION_ERROR")
    assert error["details"] == {"last_event_id": "not a position this service issued"}
    error = assert_error(httpx.get(f"{base}/api/tasks/stream", headers={
        **bearer(me), "Last-Event-ID": "garbage"}), 422, "VALIDATION_ERROR")
    error = assert_error(httpx.get(f"{base}/api/tasks/stream", headers=bearer(me),
                                   params={"since": "x"}), 422, "VALIDATION_ERROR")
    assert "since" in error["details"]
    expired = mint_token(TEST_SECRET, me, ttl_seconds=-10)
    assert_error(httpx.get(f"{base}/api/tasks/stream", headers={
        "Authorization": f"Bearer {expired}"}), 401, "UNAUTHORIZED")


def test_a_stream_resumed_from_an_old_position_gets_every_later_change_once(
    command_client: TestClient, api: tuple[str, StreamHub]
):
    base, _ = api
    user = new_user()
    tasks, positions = [], []
    for i in range(6):
        task, position = create(command_client, user, f"task {i}")
        tasks.append(task)
        positions.append(position)
    # Task 3 changes twice more: a resumed stream gets it once, at its latest version.
    write(command_client, "PATCH", f"/api/tasks/{tasks[3]['id']}", user, {"title": "3 again"})
    last, last_at = write(command_client, "PATCH", f"/api/tasks/{tasks[3]['id']}", user,
                          {"completed": True})
    _, deleted_at = write(command_client, "DELETE", f"/api/tasks/{tasks[5]['id']}", user)
    expected = [(positions[2], tasks[2]), (positions[4], tasks[4]), (last_at, last),
                (deleted_at, None)]
    # Projected (a read reflects the user's own writes): a gap read sees each task once,
    # at its latest version. (While the projector lags, a task can come more than once,
    # each time at a later position; never the same position twice.)
    caught_up(base, user)

    for how in ("query", "header"):
        if how == "query":
            sse = stream(base, user, last_event_id=positions[1])
        else:  # the header wins over the parameter, as EventSource sends it
            sse = SseClient(f"{base}/api/tasks/stream", headers={
                **bearer(user), "Last-Event-ID": positions[1]},
                params={"last_event_id": positions[4]}).open()
        with sse:
            events = sse.take(len(expected))
            assert [(e.id, e.json() if e.event == "task" else None) for e in events] == expected
            ready = sse.next()
            assert ready.event == "ready" and ready.json()["resumed"] is True
            assert decode(ready.id) >= decode(deleted_at)
            # Then live, no duplicate of what came before.
            new, new_at = create(command_client, user, "after")
            (event,) = sse.take(1)
            assert (event.id, event.json()) == (new_at, new)
            expected.append((new_at, new))

    # A reconnect from any id in between: exactly what came after it.
    with stream(base, user, last_event_id=expected[2][0]) as sse:
        got = sse.take(3)
        assert [e.id for e in got] == [p for p, _ in expected[3:]]
        assert sse.quiet(0.5) == []


def test_reconnecting_streams_miss_nothing_and_repeat_nothing(
    command_client: TestClient, api: tuple[str, StreamHub]
):
    """Writes go on while a client drops and reconnects from its last id, again and
    again: the union of what it saw is every change, once, in order."""
    base, _ = api
    user = new_user()
    stop = threading.Event()
    written: list[str] = []

    def writer() -> None:
        i = 0
        while not stop.is_set():
            _, position = create(command_client, user, f"w{i}")
            written.append(position)
            i += 1
            time.sleep(0.005)

    seen: list[str] = []
    last = None
    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for _ in range(8):
            params = {"last_event_id": last} if last else {}
            with stream(base, user, **params) as sse:
                deadline = time.monotonic() + 0.4
                while time.monotonic() < deadline:
                    event = sse.next(2)
                    if event.event == "task":
                        seen.append(event.id)
                        last = event.id
                    elif event.event == "ready":
                        last = last or event.id
                    assert event.event != CLOSED
    finally:
        stop.set()
        thread.join(10)
    with stream(base, user, last_event_id=last) as sse:
        while len(seen) < len(written) - written.index(seen[0]):
            event = sse.next_of("task", timeout=5)
            assert event.event == "task", event
            seen.append(event.id)
        assert sse.quiet(0.5) == []
    assert len(written) > 20
    assert seen == written[written.index(seen[0]):]  # each once, in order, none missing
    assert seen == sorted(seen, key=decode)


def test_caps_per_user_and_per_process_answer_429_and_503(
    settings: Settings, live_projector: None
):
    with query_api(settings, stream_max_per_user=2, stream_max_per_process=3) as (base, hub):
        me, other = new_user(), new_user()
        first, second = stream(base, me), stream(base, me)
        try:
            assert first.status == second.status == 200
            response = httpx.get(f"{base}/api/tasks/stream", headers=bearer(me))
            error = assert_error(response, 429, "TOO_MANY_REQUESTS")
            assert "STREAM_MAX_PER_USER" in error["message"]
            assert response.headers["Retry-After"]
            third = stream(base, other)
            try:
                assert third.status == 200 and hub.open == 3
                response = httpx.get(f"{base}/api/tasks/stream", headers=bearer(new_user()))
                error = assert_error(response, 503, "SERVICE_UNAVAILABLE")
                assert "STREAM_MAX_PER_PROCESS" in error["message"]
                assert response.headers["Retry-After"] == "1"
            finally:
                third.close()
            # A slot frees when its client goes.
            first.close()
            wait_until(lambda: hub.open == 1, what="the closed streams leave")
            with stream(base, me) as again:
                assert again.status == 200 and again.next().event == "ready"
        finally:
            first.close()
            second.close()
        wait_until(lambda: hub.open == 0, what="every stream leaves")


def test_a_consumer_that_stops_reading_is_dropped_within_its_bounds(
    command_client: TestClient, settings: Settings, live_projector: None
):
    """A client that never reads: once the socket's buffers are full, its changes wait
    in its bounded buffer; past STREAM_BUFFER_EVENTS (or a write blocked for
    STREAM_SEND_TIMEOUT) it is dropped as a slow consumer, and its connection closed."""
    user = new_user()
    dropped = STREAMS_ENDED.labels("slow_consumer")
    before = dropped._value.get()
    with query_api(settings, stream_buffer_events=20, stream_send_timeout=2) as (base, hub):
        port = int(base.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.connect(("127.0.0.1", port))
        token = mint_token(TEST_SECRET, user)
        sock.sendall(f"GET /api/tasks/stream HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        try:
            wait_until(lambda: hub.open == 1, what="the stream opens")
            body = {"title": "t" * 255, "description": "d" * 2000}
            written = 0
            deadline = time.monotonic() + 60
            while hub.open and time.monotonic() < deadline:
                for _ in range(20):
                    write(command_client, "POST", "/api/tasks", user, body)
                    written += 1
            assert hub.open == 0, f"not dropped after {written} changes of ~2.5 kB"
            assert dropped._value.get() == before + 1
            # Its connection is closed: what the kernel held, then the end.
            sock.settimeout(10)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            assert b"HTTP/1.1 200" in received[:20]
            assert len(received) < written * 2600  # far from everything: dropped, not kept
            if b"event: end" in received:
                assert b'"reason":"slow_consumer"' in received
        finally:
            sock.close()


def test_graceful_shutdown_ends_every_stream_with_a_reason(
    settings: Settings, live_projector: None
):
    with query_api(settings) as (base, hub):
        streams = [stream(base, new_user()) for _ in range(3)]
        try:
            for sse in streams:
                assert sse.next().event == "ready"
            hub.drain("shutdown")
            for sse in streams:
                end = sse.next_of("end")
                assert end.event == "end" and end.json()["reason"] == "shutdown"
                assert sse.next().event == CLOSED  # and the response ends
            response = httpx.get(f"{base}/api/tasks/stream", headers=bearer(new_user()))
            assert_error(response, 503, "SERVICE_UNAVAILABLE")
        finally:
            for sse in streams:
                sse.close()


# -- tickets and token expiry --------------------------------------------------------


def ticket_for(base: str, user: str, path: str = "/api/tasks/stream/tickets",
               **token: Any) -> dict[str, Any]:
    response = httpx.post(base + path, headers=bearer(user, **token))
    assert response.status_code == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    return response.json()["data"]


def test_a_ticket_opens_one_stream_once(command_client: TestClient, api: tuple[str, StreamHub]):
    base, _ = api
    user = new_user()
    ticket = ticket_for(base, user)
    assert ticket["ticket"].startswith("st1.") and 59 <= ticket["expires_in"] <= 60
    assert user not in ticket["ticket"]  # sealed: the user is not readable in it
    with stream(base, None, ticket=ticket["ticket"]) as sse:
        assert sse.status == 200 and sse.next().event == "ready"
        task, at = create(command_client, user, "via a ticket")
        (event,) = sse.take(1)
        assert (event.id, event.json()) == (at, task)
        # Used: refused while the first stream is open, and after.
        with stream(base, None, ticket=ticket["ticket"]) as again:
            assert again.status == 401
            assert b"Stream ticket already used" in again.body
    response = httpx.get(f"{base}/api/tasks/stream", params={"ticket": ticket["ticket"]})
    assert_error(response, 401, "UNAUTHORIZED")
    # Forged or damaged tickets, and tickets of the path contract.
    for forged in ("st1.AAAA", ticket["ticket"][:-2] + "xy", "nope", "st1." + "A" * 3000):
        response = httpx.get(f"{base}/api/tasks/stream", params={"ticket": forged})
        assert response.status_code in (401, 422), (forged, response.text)
    other = ticket_for(base, user, f"/api/{user}/tasks/stream/tickets")
    response = httpx.get(f"{base}/api/{new_user()}/tasks/stream",
                         params={"ticket": other["ticket"]})
    assert_error(response, 403, "FORBIDDEN")
    response = httpx.post(f"{base}/api/{new_user()}/tasks/stream/tickets", headers=bearer(user))
    assert_error(response, 403, "FORBIDDEN")
    assert_error(httpx.post(f"{base}/api/tasks/stream/tickets"), 401, "UNAUTHORIZED")


def test_a_ticket_expires_unused(settings: Settings, live_projector: None):
    with query_api(settings) as (base, hub):
        hub.tickets = Tickets(b"k" * 32, seconds=0.5)
        user = new_user()
        ticket = ticket_for(base, user)
        assert ticket["expires_in"] <= 0.5
        time.sleep(0.7)
        response = httpx.get(f"{base}/api/tasks/stream", params={"ticket": ticket["ticket"]})
        assert_error(response, 401, "UNAUTHORIZED")
        # Another process's key (another deployment): not ours.
        fresh = ticket_for(base, user)
        hub.tickets = Tickets(b"x" * 32)
        response = httpx.get(f"{base}/api/tasks/stream", params={"ticket": fresh["ticket"]})
        assert_error(response, 401, "UNAUTHORIZED")


def test_an_expiring_token_ends_its_stream_with_an_event_saying_so(
    api: tuple[str, StreamHub]
):
    base, _ = api
    user = new_user()
    short = mint_token(TEST_SECRET, user, ttl_seconds=2)
    with stream(base, None, token=short) as by_header:
        # A ticket bought with it lasts no longer than the token either.
        response = httpx.post(f"{base}/api/tasks/stream/tickets",
                              headers={"Authorization": f"Bearer {short}"})
        assert response.status_code == 201
        assert response.json()["data"]["expires_in"] <= 2
        with stream(base, None, ticket=response.json()["data"]["ticket"]) as by_ticket:
            for sse in (by_header, by_ticket):
                assert sse.next().event == "ready"
            for sse in (by_header, by_ticket):
                end = sse.next_of("end", timeout=5)
                assert end.event == "end", end
                assert end.json()["reason"] == "token_expired"
                assert sse.next().event == CLOSED


# -- a replay's switch of the read tables --------------------------------------------


@pytest.fixture
def own_db(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database()
    init_database(Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET))
    yield url
    pg_server.drop_database(url)


def test_a_replay_switch_during_an_open_stream_loses_and_repeats_nothing(own_db: str):
    settings = Settings(environment="test", database_url=own_db, better_auth_secret=TEST_SECRET)
    user = new_user()
    written: list[str] = []
    stop = threading.Event()

    with TestClient(create_command_app(settings)) as commands, projector(own_db), \
            query_api(settings) as (base, hub):
        for i in range(300):  # something for the replay to rebuild
            written.append(create(commands, user, f"before {i}")[1])

        def writer() -> None:
            i = 0
            while not stop.is_set():
                written.append(create(commands, user, f"during {i}")[1])
                i += 1

        with stream(base, user, last_event_id=written[99]) as sse:
            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            try:
                result = asyncio.run(replay(own_db))
                assert result.switched and result.version == 1
                time.sleep(0.3)
            finally:
                stop.set()
                thread.join(10)
            for i in range(5):
                written.append(create(commands, user, f"after {i}")[1])
            expected = written[100:]
            got = [e.id for e in sse.take(len(expected), timeout=30)]
            assert got == expected
            assert sse.quiet(0.5) == []
        assert hub.reads > 0


def test_taskctl_devs_one_origin_serves_the_stream_and_its_tickets(
    settings: Settings, live_projector: None
):
    """`taskctl dev` sends the ticket's POST to the query app (other POSTs go to the
    command app), and its stream follows the writes made on the same origin."""
    from taskctl.dev import create_dev_app

    with serve(create_dev_app(settings)) as base:
        user = new_user()
        ticket = ticket_for(base, user)
        with stream(base, None, ticket=ticket["ticket"]) as sse:
            assert sse.status == 200 and sse.next().event == "ready"
            response = httpx.post(f"{base}/api/tasks", headers=bearer(user),
                                  json={"title": "through taskctl dev"})
            assert response.status_code == 201, response.text
            (event,) = sse.take(1)
            assert event.id == response.headers["X-Position"]
            assert event.json() == response.json()["data"]
