"""`taskctl dev` and `taskctl query-api` as real processes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, PostgresServer, bearer, new_user
from tests.support.signing import claims, new_key

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def own_db(pg_server: PostgresServer) -> Iterator[str]:
    url = pg_server.create_database("taskservice_dev_e2e")
    init_database(Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET))
    yield url
    pg_server.drop_database(url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """One `taskctl` process, its output in a file; always stopped by its PID."""

    def __init__(self, url: str, log: Path, *args: str) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "ENVIRONMENT": "test",
            "BETTER_AUTH_SECRET": TEST_SECRET,
            "LOG_LEVEL": "WARNING",
        }
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskctl.cli", *args, "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_healthy(self.proc, self.base, self.log, timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._out.close()
        return self.proc.returncode


@pytest.fixture
def dev(own_db: str, tmp_path: Path) -> Iterator[Service]:
    service = Service(own_db, tmp_path / "dev.log", "dev", "--data-dir", str(tmp_path / "data"))
    try:
        service.wait_healthy()
        yield service
    finally:
        service.stop()
    log = service.log.read_text()
    assert "Traceback" not in log and "CRITICAL" not in log, log


def test_taskctl_dev_reads_its_writes_through_one_port(dev: Service):
    user = new_user()
    with httpx.Client(base_url=dev.base, headers=bearer(user), timeout=10) as client:
        for i in range(3):
            created = client.post("/api/tasks", json={"title": f"e2e {i}"})
            assert created.status_code == 201, created.text
            position = created.headers["X-Position"]
            read = client.get(
                f"/api/tasks/{created.json()['data']['id']}", headers={"X-Min-Position": position}
            )
            assert read.status_code == 200, read.text
            assert read.json()["data"] == created.json()["data"]
            assert read.json()["meta"]["stale"] is False
        listed = client.get("/api/tasks", params={"min_position": position, "sort": "title"})
        assert [t["title"] for t in listed.json()["data"]] == ["e2e 0", "e2e 1", "e2e 2"]
        assert listed.json()["meta"]["total"] == 3
    demo = bearer("11111111-1111-1111-1111-111111111111")
    seeded = httpx.get(f"{dev.base}/api/stats", headers=demo, timeout=10)
    assert seeded.json()["data"]["total"] == 3  # the seed, projected by the dev projector


def test_taskctl_query_api_serves_the_read_tables(own_db: str, tmp_path: Path):
    service = Service(own_db, tmp_path / "query.log", "query-api")
    try:
        service.wait_healthy()
        ready = httpx.get(f"{service.base}/api/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["data"]["service"] == "query-api"
        assert ready.json()["data"]["position"].startswith("p3.")
        listed = httpx.get(f"{service.base}/api/tasks/", headers=bearer(new_user()), timeout=10)
        assert listed.status_code == 200 and listed.json()["meta"]["total"] == 0
    finally:
        assert service.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        assert "Traceback" not in service.log.read_text(), service.log.read_text()


# -- `taskctl dev` on its embedded PostgreSQL, with no environment set ------------------

def bare_env(**extra: str) -> dict[str, str]:
    """The environment of a new user: none of the service's settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "JWKS_URL",
                        "ENVIRONMENT", "TASKCTL_DATA_DIR", "PORT")}
    env.update(LOG_LEVEL="WARNING", **extra)
    return env


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float) -> None:
    """Until `base` answers /api/health with 200; the log if the process dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{base}/api/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not healthy in {timeout}s:\n{log.read_text()}")


def postgres_on(folder: Path) -> list[int]:
    """PIDs of postgres processes whose command line names this data folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "postgres" in cmdline and str(folder) in cmdline:
            found.append(int(entry.name))
    return found


class EmbeddedDev:
    """`taskctl dev` in `workdir` with no DATABASE_URL or auth settings; its own PID only."""

    def __init__(self, workdir: Path, port: int | None = None, **env: str) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"dev-{self.port}-{time.monotonic_ns()}.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskctl.cli", "dev", "--port", str(self.port)],
            cwd=workdir, env=bare_env(PYTHONPATH=str(ROOT), **env), stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        STARTED.append(self)

    @property
    def pgdata(self) -> Path:
        return (self.workdir / ".data" / "postgres" / "pgdata").resolve()

    def wait_healthy(self, timeout: float = 90) -> None:
        wait_healthy(self.proc, self.base, self.log, timeout)

    def wait(self, timeout: float = 45) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"still running {timeout}s after the signal:\n"
                                 f"{self.log.read_text()}") from None
        finally:
            self._out.close()


STARTED: list[EmbeddedDev] = []


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    # Whatever a test left running is stopped: its own `taskctl dev` processes by PID,
    # then the postgres processes found on its folder.
    while STARTED:
        dev = STARTED.pop()
        if dev.proc.poll() is None:
            dev.proc.kill()
            dev.proc.wait(timeout=10)
    for pid in postgres_on(tmp_path.resolve()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_stops_taskctl_dev_and_its_postgres(workdir: Path, stop: signal.Signals):
    dev = EmbeddedDev(workdir)
    dev.wait_healthy()
    assert postgres_on(dev.pgdata), dev.log.read_text()
    dev.proc.send_signal(stop)
    assert dev.wait() == 0, dev.log.read_text()
    assert postgres_on(dev.pgdata) == [], dev.log.read_text()
    assert "Traceback" not in dev.log.read_text(), dev.log.read_text()
    assert not (workdir / ".data" / "database-url").exists()


def test_a_start_after_sigkill_stops_the_orphan_and_serves_again(workdir: Path):
    first = EmbeddedDev(workdir)
    first.wait_healthy()
    orphan = postgres_on(first.pgdata)
    postmaster = int((first.pgdata / "postmaster.pid").read_text().split()[0])
    first.proc.kill()
    first.wait()
    # Orphaned: the server outlives its owner (the backends of its connections need not).
    assert postmaster in orphan and postmaster in postgres_on(first.pgdata)

    second = EmbeddedDev(workdir)
    second.wait_healthy()
    assert not set(orphan) & set(postgres_on(second.pgdata))  # the orphan was stopped
    token = subprocess.run(
        [sys.executable, "-m", "taskctl.cli", "token", "--user", "after-kill"], cwd=workdir,
        env=bare_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    created = httpx.post(f"{second.base}/api/tasks", json={"title": "after a SIGKILL"},
                         headers={"Authorization": f"Bearer {token.stdout.strip()}"}, timeout=10)
    assert created.status_code == 201, created.text
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 0, second.log.read_text()
    assert postgres_on(second.pgdata) == []


def test_a_busy_port_fails_before_anything_is_printed(workdir: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        dev = EmbeddedDev(workdir, port=port)
        assert dev.wait(30) != 0
    out = dev.log.read_text()
    assert f"port {port}" in out and "PORT=" in out, out
    assert "TOKEN" not in out and "Task service on" not in out, out
    assert not (workdir / ".data" / "postgres").exists()  # nothing was started either


def test_an_unreachable_better_auth_url_is_said_not_silent(workdir: Path):
    closed = free_port()  # nothing listens there
    dev = EmbeddedDev(workdir, BETTER_AUTH_URL=f"http://127.0.0.1:{closed}")
    dev.wait_healthy()
    try:  # what the banner says a request with a token gets, it gets
        token = new_key().token(claims())
        answer = httpx.get(f"{dev.base}/api/tasks", headers={"Authorization": f"Bearer {token}"},
                           timeout=30)
        assert answer.status_code == 503 and answer.headers["Retry-After"], answer.text
    finally:
        dev.proc.send_signal(signal.SIGTERM)
    assert dev.wait() == 0
    out = dev.log.read_text()
    assert "TOKEN=" not in out and "No demo tokens" in out, out
    assert f"http://127.0.0.1:{closed}/api/auth/jwks is not reachable" in out, out
    assert "will get 503 SERVICE_UNAVAILABLE" in out and "401" not in out.split("WARNING")[1], out


def test_the_cli_finds_the_dev_service_with_no_environment(workdir: Path):
    dev = EmbeddedDev(workdir)
    dev.wait_healthy()
    try:
        data = workdir / ".data"
        for name in ("database-url", "dev-secret"):
            assert (data / name).stat().st_mode & 0o777 == 0o600, name

        def taskctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "taskctl.cli", *args], cwd=workdir,
                                  env=bare_env(PYTHONPATH=str(ROOT)), capture_output=True,
                                  text=True, timeout=60)

        for args in (["token", "--user", "someone"], ["seed"], ["audit"],
                     ["projections", "status"]):
            result = taskctl(*args)
            assert result.returncode == 0, (args, result.stdout, result.stderr)
            assert result.stderr.count("\n") == 1 and "dev service" in result.stderr, result.stderr
        assert taskctl("token", "--user", "x").stdout.count(".") == 2  # a JWT

        # A closed pipe ends a printing command quietly, status 0.
        piped = subprocess.run(
            f"{sys.executable} -m taskctl.cli audit | head -1; exit ${{PIPESTATUS[0]}}",
            shell=True, executable="/bin/bash", cwd=workdir, capture_output=True, text=True,
            env=bare_env(PYTHONPATH=str(ROOT)), timeout=60)
        assert piped.returncode == 0, piped.stderr
        assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr
        assert piped.stdout.count("\n") == 1
    finally:
        dev.proc.send_signal(signal.SIGTERM)
        dev.wait()


def test_one_version_from_pyproject_in_both_openapi_documents_and_taskctl(dev: Service):
    import tomllib

    from command_api.app import create_app as command_app
    from query_api.app import create_app as query_app

    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    shown = subprocess.run([sys.executable, "-m", "taskctl.cli", "--version"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert shown.stdout.strip() == f"taskctl {expected}", shown
    assert httpx.get(f"{dev.base}/openapi.json", timeout=10).json()["info"]["version"] == expected
    settings = Settings(environment="test", database_url="postgresql://unused@/unused",
                        better_auth_secret=TEST_SECRET)
    assert command_app(settings).openapi()["info"]["version"] == expected
    assert query_app(settings).openapi()["info"]["version"] == expected


def test_taskctl_dev_logs_one_json_line_per_request_and_nothing_else(own_db: str, tmp_path: Path):
    """stderr carries the logs, every line a JSON object (no `INFO:...` lines, no ANSI
    `color_message`); each request is one line with what an operator looks for."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": own_db, "ENVIRONMENT": "test",
           "BETTER_AUTH_SECRET": TEST_SECRET, "LOG_LEVEL": "INFO"}
    out, err = tmp_path / "dev.out", tmp_path / "dev.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskctl.cli", "dev", "--host", "127.0.0.1", "--port",
             str(port), "--data-dir", str(tmp_path / "data")],
            cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, base, err, 30)
            user = new_user()
            created = httpx.post(f"{base}/api/tasks", json={"title": "logged"}, timeout=10,
                                 headers={**bearer(user), "X-Request-ID": "log-check-1"})
            assert created.status_code == 201, created.text
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
    lines = err.read_text().splitlines()
    assert lines, "no log lines"
    records = []
    for line in lines:
        assert line.strip(), f"an empty log line in {lines}"
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    assert not [r for r in records if "color_message" in r or "\x1b[" in json.dumps(r)]
    requests = [r for r in records if r.get("request_id") == "log-check-1"]
    assert len(requests) == 1, requests
    entry = requests[0]
    assert entry["logger"] == "taskservice.access" and entry["level"] == "INFO"
    assert (entry["method"], entry["path"], entry["status"]) == ("POST", "/api/tasks", 201)
    assert entry["user_id"] == user
    assert isinstance(entry["duration_ms"], (int, float)) and entry["duration_ms"] >= 0
    assert "Task service on" in out.read_text()  # the banner is for people: on stdout


def test_under_taskctl_dev_a_frontend_reads_its_writes_without_a_position(dev: Service):
    """Create, then at once get and list with no header, 200 times: every task visible."""
    with httpx.Client(base_url=dev.base, headers=bearer(new_user()), timeout=10) as client:
        for i in range(200):
            created = client.post("/api/tasks", json={"title": f"seen {i}"})
            assert created.status_code == 201, created.text
            task = created.json()["data"]
            got = client.get(f"/api/tasks/{task['id']}")
            assert got.status_code == 200, (i, got.text)
            assert got.json()["data"] == task and got.json()["meta"]["stale"] is False
            listed = client.get("/api/tasks", params={"limit": 1})
            assert listed.json()["data"] == [task], (i, listed.text)
            assert listed.json()["meta"]["total"] == i + 1
