"""Faults on the command side, against a real `taskctl command-api` process.

- Its database connections are killed (`pg_terminate_backend`) during a burst of writes:
  requests fail fast with 503 in the envelope (never 500, never a hang), the process
  recovers by itself, every 2xx is in the event store, and a retry with the same
  Idempotency-Key settles every request that failed (exactly one task per key).
- Started before its database exists, it answers 503 and becomes ready once the
  database is created and initialised, without a restart.

Only backends of this test's own process are terminated: the service runs with its own
`application_name` (libpq's PGAPPNAME), and the filter also names the test database."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from shared.settings import Settings, database_url
from taskctl.dbinit import init_database
from tests.support import (
    TEST_SECRET,
    PostgresServer,
    bearer,
    database_name,
    new_user,
)

ROOT = Path(__file__).resolve().parents[2]
TASKCTL = str(Path(sys.executable).with_name("taskctl"))
FAIL_FAST_SECONDS = 5.0  # DB_CONNECT_TIMEOUT is 2 s; a request must never wait much longer
BURST_SECONDS = 6.0
WRITERS = 4
KILL_EVERY_SECONDS = 0.4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    process: subprocess.Popen
    base_url: str
    app_name: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_service(database_url: str, tmp_path: Path) -> Service:
    port = free_port()
    app_name = f"taskservice-faults-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "ENVIRONMENT": "test",
        "BETTER_AUTH_SECRET": TEST_SECRET,
        "DB_CONNECT_TIMEOUT": "2",
        "DB_POOL_SIZE": "4",
        "DB_MAX_OVERFLOW": "4",
        "LOG_LEVEL": "WARNING",
        "PGAPPNAME": app_name,
    }
    log = tmp_path / f"{app_name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [TASKCTL, "command-api", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    service = Service(process, f"http://127.0.0.1:{port}", app_name, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, service.output()
        try:
            httpx.get(f"{service.base_url}/api/health", timeout=1)
            return service
        except httpx.TransportError:
            time.sleep(0.1)
    stop_service(service)
    pytest.fail(f"command API did not start: {service.output()}")


def stop_service(service: Service) -> None:
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait(timeout=5)


def wait_ready(service: Service, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    response = None
    while time.monotonic() < deadline:
        assert service.process.poll() is None, service.output()
        try:
            response = httpx.get(f"{service.base_url}/api/ready", timeout=FAIL_FAST_SECONDS)
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"not ready after {timeout}s: {response and response.text}\n{service.output()}")


def terminate_backends(database_url: str, admin_url: str, app_name: str) -> int:
    """Kill this service's connections (and only those) to this test's database."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name = %s AND pid <> pg_backend_pid()",
            (database_name(database_url), app_name),
        ).fetchall()
    return sum(1 for (killed,) in rows if killed)


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"]["code"] == "SERVICE_UNAVAILABLE", body
    assert set(body) == {"error", "detail", "meta"} and body["meta"]["request_id"], body
    assert response.headers.get("Retry-After"), response.headers


@pytest.fixture
def service(database_url: str, tmp_path: Path) -> Iterator[Service]:
    service = start_service(database_url, tmp_path)
    try:
        wait_ready(service, timeout=20)
        yield service
    finally:
        stop_service(service)


# -- connections killed during a burst of writes ------------------------------------------


@dataclass
class Burst:
    user: str
    outcomes: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # key -> (status, task id)
    slowest: float = 0.0
    transport_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def write(self, client: httpx.Client, key: str) -> None:
        started = time.monotonic()
        try:
            response = client.post(
                "/api/tasks",
                json={"title": f"burst {key}"},
                headers={**bearer(self.user), "Idempotency-Key": key},
            )
        except httpx.TransportError:
            with self.lock:
                self.transport_errors += 1
                self.outcomes[key] = (0, None)
            return
        elapsed = time.monotonic() - started
        task_id = None
        if response.status_code == 201:
            task_id = response.json()["data"]["id"]
        elif response.status_code == 503:
            assert_unavailable(response)
        with self.lock:
            self.slowest = max(self.slowest, elapsed)
            self.outcomes[key] = (response.status_code, task_id)


def stored_tasks_of(database_url: str, user: str) -> Counter[str]:
    """Task ids of the user's TaskCreated events, counted (a duplicate would count 2)."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT originator_id::text FROM tasks_events WHERE topic = 'TaskCreated'"
            " AND convert_from(state, 'UTF8')::jsonb ->> 'owner' = %s",
            (user,),
        ).fetchall()
    return Counter(task_id for (task_id,) in rows)


def test_killed_connections_fail_fast_and_lose_or_double_nothing(
    service: Service, database_url: str, pg_server: PostgresServer
):
    burst = Burst(user=new_user())
    stop = threading.Event()
    kills: list[int] = []

    def killer() -> None:
        while not stop.wait(KILL_EVERY_SECONDS):
            kills.append(terminate_backends(database_url, pg_server.url, service.app_name))

    def writer(n: int) -> None:
        with httpx.Client(base_url=service.base_url, timeout=FAIL_FAST_SECONDS * 2) as client:
            i = 0
            while not stop.is_set():
                burst.write(client, f"burst-{n}-{i}")
                i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    killing = threading.Thread(target=killer)
    for thread in [*threads, killing]:
        thread.start()
    time.sleep(BURST_SECONDS)
    stop.set()
    for thread in [*threads, killing]:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in [*threads, killing]), "a writer hung"

    statuses = Counter(status for status, _ in burst.outcomes.values())
    print(
        f"\ncommand faults: {len(burst.outcomes)} writes, {sum(kills)} backends terminated,"
        f" statuses {dict(statuses)}, slowest {burst.slowest:.2f}s"
    )
    assert sum(kills) >= 5, kills
    assert set(statuses) <= {201, 503}, statuses  # never 500, never anything else
    assert statuses[201] >= 5 and statuses[503] >= 1, statuses
    assert burst.transport_errors == 0, "the server dropped a connection instead of answering"
    assert burst.slowest < FAIL_FAST_SECONDS, burst.slowest

    # Recovered by itself: the same process answers ready and writes again.
    wait_ready(service, timeout=15)
    assert service.process.poll() is None

    # Every 2xx is stored, exactly once.
    stored = stored_tasks_of(database_url, burst.user)
    acknowledged = {task_id for status, task_id in burst.outcomes.values() if status == 201}
    assert acknowledged <= set(stored), acknowledged - set(stored)

    # Which failed requests had committed anyway (the connection died after the commit)?
    with psycopg.connect(database_url) as conn:
        recorded = {
            key
            for (key,) in conn.execute(
                "SELECT key FROM command_idempotency WHERE user_id = %s", (burst.user,)
            ).fetchall()
        }
    failed = {key for key, (status, _) in burst.outcomes.items() if status != 201}
    assert recorded >= set(burst.outcomes) - failed
    print(f"command faults: {len(failed & recorded)} of {len(failed)} failed writes had committed")

    # Every failed request, retried with its key, settles as exactly one task.
    settled: dict[str, str] = {}
    with httpx.Client(base_url=service.base_url, timeout=FAIL_FAST_SECONDS * 2) as client:
        for key, (status, task_id) in burst.outcomes.items():
            response = client.post(
                "/api/tasks",
                json={"title": f"burst {key}"},
                headers={**bearer(burst.user), "Idempotency-Key": key},
            )
            assert response.status_code == 201, response.text
            settled[key] = response.json()["data"]["id"]
            if status == 201:  # a replay names the same task
                assert settled[key] == task_id

    stored = stored_tasks_of(database_url, burst.user)
    assert set(stored) == set(settled.values())
    assert len(set(settled.values())) == len(settled)  # one task per key
    assert all(count == 1 for count in stored.values()), stored
    # A failed request that was never committed left no event: the retry wrote it, and
    # nothing else exists for this user beyond one task per key.
    assert len(stored) == len(burst.outcomes)
    assert "unhandled error" not in service.output()


# -- started before the database exists ---------------------------------------------------


def test_starts_without_its_database_and_becomes_ready_once_it_exists(
    pg_server: PostgresServer, tmp_path: Path
):
    name = f"taskservice_test_late_{uuid.uuid4().hex[:10]}"
    url = database_url(pg_server.url, dbname=name)
    service = start_service(url, tmp_path)
    try:
        user = new_user()
        started = time.monotonic()
        ready = httpx.get(f"{service.base_url}/api/ready", timeout=FAIL_FAST_SECONDS * 2)
        assert_unavailable(ready)
        write = httpx.post(
            f"{service.base_url}/api/tasks",
            json={"title": "too early"},
            headers=bearer(user),
            timeout=FAIL_FAST_SECONDS * 2,
        )
        assert_unavailable(write)
        assert time.monotonic() - started < 2 * FAIL_FAST_SECONDS
        assert httpx.get(f"{service.base_url}/api/health", timeout=2).status_code == 200

        with psycopg.connect(pg_server.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        init_database(Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET))

        became_ready = time.monotonic()
        wait_ready(service, timeout=30)
        print(f"\nready {time.monotonic() - became_ready:.1f}s after the database was created")
        write = httpx.post(
            f"{service.base_url}/api/tasks",
            json={"title": "on time"},
            headers=bearer(user),
            timeout=FAIL_FAST_SECONDS * 2,
        )
        assert write.status_code == 201, write.text
        assert service.process.poll() is None
        assert stored_tasks_of(url, user) == Counter({write.json()["data"]["id"]: 1})
    finally:
        stop_service(service)
        pg_server.drop_database(url)
