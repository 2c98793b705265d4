"""Read-your-writes: `meta.position`, `X-Min-Position` / `min_position`, the wait
for the projector, `stale`, and the query API while the database is away."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from query_api.app import create_app
from shared.settings import Settings
from tests.support import bearer, new_user
from tests.support.projection import catch_up
from tests.support.query import assert_error, create, position_of, write


@pytest.fixture(scope="module")
def query_client(settings: Settings) -> Iterator[TestClient]:
    quick = settings.model_copy(update={"read_wait_timeout": 0.4})
    with TestClient(create_app(quick), raise_server_exceptions=False) as client:
        yield client


def test_reads_do_not_start_the_position_watch(query_client: TestClient):
    user = new_user()
    assert query_client.get("/api/tasks", headers=bearer(user)).status_code == 200
    assert query_client.get("/api/stats", headers=bearer(user)).status_code == 200
    assert query_client.app.state.read_side.watch._task is None


async def test_a_read_waits_for_a_position_and_reports_stale_when_the_projector_lags(
    command_client: TestClient, query_client: TestClient, database_url: str
):
    user = new_user()
    await catch_up(database_url)
    task, position = create(command_client, user, "Not projected yet")

    started = time.monotonic()
    lagging = query_client.get("/api/tasks", headers={**bearer(user), "X-Min-Position": position})
    waited = time.monotonic() - started
    assert lagging.status_code == 200
    assert lagging.json()["data"] == []
    assert lagging.json()["meta"]["stale"] is True
    assert position_of(lagging.json()["meta"]["position"]) < position_of(position)
    assert waited >= 0.4
    by_query = query_client.get(
        f"/api/tasks/{task['id']}", params={"min_position": position}, headers=bearer(user)
    )
    assert_error(by_query, 404, "NOT_FOUND")
    # ...and says it may be there yet: the wait for the position timed out.
    assert by_query.json()["meta"]["stale"] is True
    assert position_of(by_query.json()["meta"]["position"]) < position_of(position)

    await catch_up(database_url)
    caught_up = query_client.get("/api/tasks", headers={**bearer(user), "X-Min-Position": position})
    assert caught_up.json()["data"] == [task]
    assert caught_up.json()["meta"]["stale"] is False
    assert position_of(caught_up.json()["meta"]["position"]) >= position_of(position)
    one = query_client.get(
        f"/api/tasks/{task['id']}", params={"min_position": position}, headers=bearer(user)
    )
    assert one.json()["data"] == task and one.json()["meta"]["stale"] is False


@pytest.mark.parametrize("token", ["12", "p1.", "p2.5", "p1.-3", "p1.99999999999999999999", "x" * 65])
@pytest.mark.parametrize("where", ["header", "query"])
@pytest.mark.parametrize("path", ["/api/tasks", "/api/stats", "/api/history"])
def test_rejects_a_position_the_service_did_not_issue(
    query_client: TestClient, token: str, where: str, path: str
):
    if where == "header":
        response = query_client.get(path, headers={**bearer(new_user()), "X-Min-Position": token})
    else:
        response = query_client.get(path, params={"min_position": token}, headers=bearer(new_user()))
    error = assert_error(response, 422, "VALIDATION_ERROR")
    assert set(error["details"]) & {"min_position", "X-Min-Position"}


async def test_writes_are_readable_on_the_first_try_with_the_projector_running(
    command_client: TestClient, settings: Settings, projector: asyncio.Task[None]
):
    """Command, then query with its position, while the projector follows live."""
    user = new_user()
    with TestClient(create_app(settings), raise_server_exceptions=False) as queries:

        def read(path: str, position: str) -> dict:
            response = queries.get(path, headers={**bearer(user), "X-Min-Position": position})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["meta"]["stale"] is False
            assert position_of(body["meta"]["position"]) >= position_of(position)
            return body["data"]

        async def step(method: str, path: str, body: object = None) -> tuple[dict | None, str]:
            return await asyncio.to_thread(write, command_client, method, path, user, body)

        for i in range(5):
            task, position = await step("POST", "/api/tasks", {"title": f"task {i}"})
            assert task is not None
            listed = await asyncio.to_thread(read, "/api/tasks", position)
            assert listed[0] == task
            changed, position = await step(
                "PATCH", f"/api/tasks/{task['id']}", {"completed": True, "title": f"done {i}"}
            )
            assert await asyncio.to_thread(read, f"/api/tasks/{task['id']}", position) == changed
            stats = await asyncio.to_thread(read, "/api/stats", position)
            assert stats == {"total": i + 1, "completed": i + 1, "pending": 0}
            history = await asyncio.to_thread(read, f"/api/tasks/{task['id']}/history", position)
            assert [h["type"] for h in history][-1] == "TaskCompleted"
        _, position = await step("DELETE", f"/api/tasks/{task['id']}")
        assert len(await asyncio.to_thread(read, "/api/tasks", position)) == 4
        feed = await asyncio.to_thread(read, "/api/history", position)
        assert feed[0]["type"] == "TaskDeleted"
        assert queries.app.state.read_side.watch.listening is True
    assert not projector.done()


async def test_ready_reports_the_position_and_the_listener(
    query_client: TestClient, database_url: str
):
    position = await catch_up(database_url)
    ready = query_client.get("/api/ready")
    assert ready.status_code == 200
    assert position_of(ready.json()["data"]["position"]) == position


# -- the database away -------------------------------------------------------------------


class Proxy:
    """A TCP forwarder on 127.0.0.1 in front of PostgreSQL that can be switched off."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        # The links first: since Python 3.12.1 `wait_closed()` waits for every connection
        # the server accepted to close, so closing them after it hung forever (seen on
        # 3.13 whenever a pooled connection was still open through the proxy).
        for writer in list(self.links):
            writer.close()
        if self.server is not None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), 10)
            self.server = None

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_answers_503_while_the_database_is_away_and_recovers_by_itself(
    settings: Settings, database_url: str
):
    from urllib.parse import urlsplit

    parts = urlsplit(database_url)
    proxy = Proxy(parts.port or 5432)
    await proxy.start()
    port = proxy.port
    await proxy.stop()  # the database is "down": nothing listens on the proxy's port
    via_proxy = parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl()
    away = settings.model_copy(update={"database_url": via_proxy, "db_connect_timeout": 1})
    user = new_user()

    def get(client: TestClient, path: str) -> object:
        return client.get(path, headers=bearer(user))

    # The proxy runs in this event loop, so the client starts and stops in a thread.
    client = TestClient(create_app(away), raise_server_exceptions=False)
    await asyncio.to_thread(client.__enter__)
    try:
        response = await asyncio.to_thread(get, client, "/api/tasks")
        assert_error(response, 503, "SERVICE_UNAVAILABLE")
        assert response.headers["Retry-After"] == "1"
        assert_error(await asyncio.to_thread(get, client, "/api/ready"), 503, "SERVICE_UNAVAILABLE")
        assert (await asyncio.to_thread(get, client, "/api/health")).status_code == 200

        proxy.port = port
        await proxy.start()  # the database is back
        back = await asyncio.to_thread(get, client, "/api/tasks")
        assert back.status_code == 200, back.text
        assert back.json()["data"] == []

        await proxy.stop()  # and away again, with the pool open
        again = await asyncio.to_thread(get, client, "/api/stats")
        assert_error(again, 503, "SERVICE_UNAVAILABLE")

        await proxy.start()
        recovered = None
        for _ in range(20):
            recovered = await asyncio.to_thread(get, client, "/api/stats")
            if recovered.status_code == 200:
                break
        assert recovered is not None and recovered.status_code == 200, recovered.text
    finally:
        await asyncio.to_thread(client.__exit__, None, None, None)
        await proxy.stop()


async def test_every_read_shows_exactly_the_writes_up_to_its_position(
    command_client: TestClient, settings: Settings, projector: asyncio.Task[None]
):
    """meta.position and the data come from one snapshot: while tasks are created and
    projected live, every list, stats and feed answer shows exactly the tasks whose
    create is at or before the position it reports, never one more or one fewer, and a
    task or its history read by id is never ahead of its answer's position."""
    user = new_user()
    created: list[tuple[str, int]] = []  # (task id, position of its create)
    samples: list[tuple[str, int, object]] = []  # (what, meta.position, data)
    done = False

    def writer() -> None:
        nonlocal done
        try:
            for i in range(40):
                task, position = create(command_client, user, f"task {i}")
                created.append((task["id"], position_of(position)))
        finally:
            done = True

    def reader(queries: TestClient) -> None:
        while not done or len(samples) < 60:
            last = created[-1][0] if created else None
            latest = [f"/api/tasks/{last}", f"/api/tasks/{last}/history"] if last else []
            for path in ("/api/tasks", "/api/stats", "/api/history", *latest):
                response = queries.get(path, headers=bearer(user))
                if response.status_code == 404:
                    continue  # not projected yet: an error answer names no position
                assert response.status_code == 200, response.text
                body = response.json()
                samples.append((path, position_of(body["meta"]["position"]), body["data"]))

    with TestClient(create_app(settings), raise_server_exceptions=False) as queries:
        await asyncio.gather(asyncio.to_thread(writer), asyncio.to_thread(reader, queries))

    assert len(created) == 40 and len(samples) >= 60
    for path, position, data in samples:
        expected = {task_id for task_id, at in created if at <= position}
        if path == "/api/tasks":
            assert {t["id"] for t in data} == expected, (position, path)
        elif path == "/api/stats":
            assert data["total"] == len(expected), (position, path)
        elif path == "/api/history":  # the feed: one TaskCreated per task, 40 < its 50
            assert {e["task_id"] for e in data} == expected, (position, path)
        elif path.endswith("/history"):
            task_id = path.split("/")[3]
            assert task_id in expected and data[0]["task_id"] == task_id, (position, path)
        else:
            task_id = path.rsplit("/", 1)[1]
            assert task_id in expected and data["id"] == task_id, (position, path)
    assert not projector.done()


def test_a_position_is_sealed_and_a_forged_or_altered_one_is_a_422(
    command_client: TestClient, query_client: TestClient
):
    from shared.position import Position, PositionCodec

    user = new_user()
    _, position = create(command_client, user, "sealed")
    assert position.startswith("p3.") and position_of(position) > Position(0, 0)
    ok = query_client.get("/api/tasks", headers={**bearer(user), "X-Min-Position": position})
    assert ok.status_code == 200
    i = len(position) // 2
    altered = position[:i] + ("A" if position[i] != "A" else "B") + position[i + 1:]
    foreign = PositionCodec(b"k" * 32).encode(position_of(position))  # same value, other key
    plain = f"p2.{position_of(position).tx_id}.{position_of(position).notification_id}"
    for forged in (altered, foreign, plain):
        response = query_client.get("/api/tasks", headers={**bearer(user), "X-Min-Position": forged})
        assert "min_position" in assert_error(response, 422, "VALIDATION_ERROR")["details"]
