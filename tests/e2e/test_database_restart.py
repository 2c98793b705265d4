"""The database restarted under load, with the real processes running.

This test starts a PostgreSQL of its own (the embedded one of `taskctl dev`, in
a temporary folder, on a unix socket; never the machine's shared server), runs
`taskctl db init`, then the real `taskctl command-api`, `taskctl query-api` and
`taskctl projector` against it on free 127.0.0.1 ports. Writers create tasks (each
with its own Idempotency-Key) and complete some, a reader lists and counts, while the
server is stopped (`pg_ctl -m fast stop`) and, a few seconds later, started again on
the same data folder and socket.

Proves: while it is down every answer is 503 SERVICE_UNAVAILABLE in the envelope with
Retry-After, quickly (never 500, never a hang, no dropped connection); once it is back
the three processes recover by themselves (both /api/ready answer 200, the projector
catches up) without a restart; every 2xx command is in the event store; retrying every
failed create with its key gives exactly one task per key; the read tables equal a
fresh rebuild; a read at the last command's position sees it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from shared.position import Position
from taskctl.dbinit import create_read_tables
from taskctl.embedded import EmbeddedPostgres
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.projection import (
    REBUILD,
    catch_up,
    checkpoint,
    max_position,
    snapshot,
    wait_until,
)
from tests.support.query import codec_for

ROOT = Path(__file__).resolve().parents[2]
TASKCTL = str(Path(sys.executable).with_name("taskctl"))
FAIL_FAST_SECONDS = 5.0  # DB_CONNECT_TIMEOUT is 2 s
LOAD_BEFORE, DOWN_FOR, LOAD_AFTER = 3.0, 4.0, 4.0
WRITERS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnPostgres:
    """A PostgreSQL server of this test only, the embedded one `taskctl dev` runs
    (`taskctl.embedded`): stopped (`pg_ctl -m fast stop`) and started again on the same
    data folder and socket."""

    def __init__(self) -> None:
        self.datadir = Path(tempfile.mkdtemp(prefix="tsdbrestart-"))
        self.server = EmbeddedPostgres(self.datadir)
        self.url = self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        assert self.server.start() == self.url  # the same socket: clients reconnect

    def running(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def destroy(self) -> None:
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.datadir, ignore_errors=True)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    base_url: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)


def env_for(url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": url, "ENVIRONMENT": "test",
            "BETTER_AUTH_SECRET": TEST_SECRET, "DB_CONNECT_TIMEOUT": "2", "LOG_LEVEL": "WARNING"}


def spawn(name: str, args: list[str], url: str, tmp: Path) -> Proc:
    log = tmp / f"{name}.log"
    with log.open("w") as out:
        popen = subprocess.Popen([TASKCTL, *args], cwd=ROOT, env=env_for(url), stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    return Proc(name, popen, log)


def serve(name: str, url: str, tmp: Path) -> Proc:
    port = free_port()
    proc = spawn(name, [name, "--host", "127.0.0.1", "--port", str(port)], url, tmp)
    proc.base_url = f"http://127.0.0.1:{port}"
    return proc


def wait_ready(proc: Proc, timeout: float) -> float:
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        assert proc.popen.poll() is None, proc.output()
        try:
            last = httpx.get(f"{proc.base_url}/api/ready", timeout=FAIL_FAST_SECONDS)
            if last.status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{proc.name} not ready after {timeout}s: {last and last.text}\n{proc.output()}")


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert set(body) == {"error", "detail", "meta"} and body["error"]["code"] == "SERVICE_UNAVAILABLE", body
    assert response.headers.get("Retry-After"), response.headers


@dataclass
class Load:
    user: str
    creates: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # key -> (status, id)
    acknowledged: list[str] = field(default_factory=list)  # task ids of 2xx commands
    statuses: Counter[str] = field(default_factory=Counter)
    down_statuses: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0
    slowest_down: float = 0.0
    transport_errors: list[str] = field(default_factory=list)
    last_position: str | None = None
    opens: Callable[[str], Position] | None = None  # the database's position seal
    down: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, client: httpx.Client, kind: str, method: str, path: str, **kw: object) -> httpx.Response | None:
        was_down = self.down.is_set()
        started = time.monotonic()
        try:
            response = client.request(method, path, headers={**bearer(self.user), **kw.pop("headers", {})}, **kw)
        except httpx.TransportError as e:
            with self.lock:
                self.transport_errors.append(f"{kind}: {type(e).__name__}: {e}")
            return None
        elapsed = time.monotonic() - started
        if response.status_code == 503:
            assert_unavailable(response)
        with self.lock:
            self.slowest = max(self.slowest, elapsed)
            self.statuses[f"{kind} {response.status_code}"] += 1
            if was_down and self.down.is_set():
                self.slowest_down = max(self.slowest_down, elapsed)
                self.down_statuses[f"{kind} {response.status_code}"] += 1
            if response.status_code in (200, 201) and "X-Position" in response.headers:
                self.last_position = self.later(response.headers["X-Position"])
        return response

    def later(self, token: str) -> str:
        """Whichever of `token` and the last position is later (sealed: opened to compare)."""
        if self.last_position is None or self.opens is None:
            return token
        return max(self.last_position, token, key=self.opens)




def stored_created(url: str, user: str) -> Counter[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT originator_id::text FROM tasks_events WHERE topic = 'TaskCreated'"
            " AND convert_from(state, 'UTF8')::jsonb ->> 'owner' = %s", (user,),
        ).fetchall()
    return Counter(r[0] for r in rows)


def stored_events(url: str) -> set[tuple[str, int]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT originator_id::text, originator_version FROM tasks_events").fetchall()
    return {(r[0], r[1]) for r in rows}


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    pg = OwnPostgres()
    try:
        yield pg
    finally:
        pg.destroy()


async def test_database_restart_under_load_fails_fast_then_recovers_and_loses_nothing(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    pg = own_postgres
    url = pg.url
    init = subprocess.run([TASKCTL, "db", "init"], cwd=ROOT, env=env_for(url), capture_output=True,
                          text=True, timeout=60)
    assert init.returncode == 0, init.stderr

    procs = [serve("command-api", url, tmp_path), serve("query-api", url, tmp_path),
             spawn("projector", ["projector", "--poll-interval", "0.2"], url, tmp_path)]
    command, query, projector = procs
    try:
        wait_ready(command, 30)
        wait_ready(query, 30)
        load = Load(user=new_user(), opens=codec_for(url).decode)
        stop = threading.Event()
        changes: list[tuple[str, int]] = []  # (task id, version) of every 200 toggle

        def writer(n: int) -> None:
            with httpx.Client(base_url=command.base_url, timeout=FAIL_FAST_SECONDS * 3) as client:
                i = 0
                while not stop.is_set():
                    key = f"restart-{n}-{i}"
                    r = load.send(client, "create", "POST", "/api/tasks",
                                  json={"title": f"task {key}"}, headers={"Idempotency-Key": key})
                    task_id = r.json()["data"]["id"] if r is not None and r.status_code == 201 else None
                    with load.lock:
                        load.creates[key] = (r.status_code if r is not None else 0, task_id)
                    if task_id and i % 2 == 0:
                        t = load.send(client, "toggle", "PATCH", f"/api/{load.user}/tasks/{task_id}/complete",
                                      headers={"Idempotency-Key": f"{key}-done"})
                        if t is not None and t.status_code == 200:
                            with load.lock:
                                changes.append((task_id, t.json()["data"]["version"]))
                    i += 1

        def reader() -> None:
            with httpx.Client(base_url=query.base_url, timeout=FAIL_FAST_SECONDS * 3) as client:
                while not stop.is_set():
                    load.send(client, "list", "GET", "/api/tasks", params={"limit": 20})
                    load.send(client, "stats", "GET", "/api/stats")

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
        threads.append(threading.Thread(target=reader))
        for t in threads:
            t.start()
        try:
            time.sleep(LOAD_BEFORE)
            pg.stop()
            load.down.set()  # from here until just before the start, every answer must be 503
            down_at = time.monotonic()
            assert not pg.running()
            # Probes while it is down: each answers 503 in the envelope, fast.
            probes = {}
            for name, proc, path in (("command ready", command, "/api/ready"),
                                     ("query ready", query, "/api/ready"),
                                     ("query list", query, "/api/tasks")):
                started = time.monotonic()
                r = httpx.get(f"{proc.base_url}{path}", headers=bearer(load.user), timeout=FAIL_FAST_SECONDS * 3)
                probes[name] = round(time.monotonic() - started, 2)
                assert_unavailable(r)
                assert probes[name] < FAIL_FAST_SECONDS, probes
            time.sleep(max(0.0, DOWN_FOR - (time.monotonic() - down_at)))
            load.down.clear()
            pg.start()
            back_at = time.monotonic()
            ready_after = {p.name: round(wait_ready(p, 30), 2) for p in (command, query)}
            recovered_in = round(time.monotonic() - back_at, 2)
            time.sleep(LOAD_AFTER)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a client hung"

        print(f"\ndatabase restart: statuses {dict(load.statuses)}; while down {dict(load.down_statuses)}"
              f" (slowest {load.slowest_down:.2f}s); probes {probes}; ready after restart {ready_after}"
              f" (both within {recovered_in}s); slowest overall {load.slowest:.2f}s")
        assert not load.transport_errors, load.transport_errors[:5]
        kinds_ok = {"create": {201, 503}, "toggle": {200, 503}, "list": {200, 503}, "stats": {200, 503}}
        for label in load.statuses:
            kind, status = label.split()
            assert int(status) in kinds_ok[kind], load.statuses  # never 500, nothing else
        assert sum(n for k, n in load.down_statuses.items() if k.endswith("503")) >= 3, load.down_statuses
        assert all(k.endswith("503") for k in load.down_statuses), load.down_statuses
        assert load.slowest_down < FAIL_FAST_SECONDS and load.slowest < FAIL_FAST_SECONDS * 2
        # Writes and reads succeeded again after the restart, in the same processes.
        assert all(p.popen.poll() is None for p in procs), [p.output() for p in procs]
        ok_after = load.statuses["create 201"]
        assert ok_after >= 5 and load.statuses["list 200"] >= 2, load.statuses

        # Every 2xx command is in the event store.
        events = stored_events(url)
        acknowledged = {tid for status, tid in load.creates.values() if status == 201}
        assert {(tid, 1) for tid in acknowledged} <= events
        assert set(changes) <= events

        # Every failed create, retried with its key, settles as exactly one task.
        settled: dict[str, str] = {}
        with httpx.Client(base_url=command.base_url, timeout=FAIL_FAST_SECONDS * 3) as client:
            for key, (status, task_id) in load.creates.items():
                r = client.post("/api/tasks", json={"title": f"task {key}"},
                                headers={**bearer(load.user), "Idempotency-Key": key})
                assert r.status_code == 201, r.text
                settled[key] = r.json()["data"]["id"]
                if status == 201:
                    assert settled[key] == task_id
                load.last_position = load.later(r.headers["X-Position"])
        created = stored_created(url, load.user)
        assert set(created) == set(settled.values()) and len(created) == len(load.creates)
        assert all(n == 1 for n in created.values()), created
        failed = sum(1 for status, _ in load.creates.values() if status != 201)

        # The projector recovered by itself and caught up; a read at the last position sees it.
        end = max_position(url)
        try:
            wait_until(lambda: checkpoint(url) == end, timeout=30)
        except AssertionError:
            pytest.fail(f"projector at {checkpoint(url)}, events end at {end}:\n{projector.output()}")
        r = httpx.get(f"{query.base_url}/api/stats",
                      headers={**bearer(load.user), "X-Min-Position": load.last_position}, timeout=10)
        assert r.status_code == 200 and r.json()["meta"]["stale"] is False, r.text
        assert r.json()["data"]["total"] == len(settled)
        assert projector.popen.poll() is None, projector.output()

        create_read_tables(url, REBUILD)
        await catch_up(url, tables=REBUILD)
        assert snapshot(url) == snapshot(url, REBUILD)
        print(f"database restart: {len(load.creates)} creates ({failed} failed, all settled on retry),"
              f" {len(changes)} toggles, {len(events)} events; read tables equal a rebuild")
        for p in procs:
            assert "unhandled error" not in p.output().lower(), p.output()
    finally:
        for p in procs:
            p.stop()
