"""`taskctl dev` and `taskctl query-api` as real processes on 127.0.0.1."""

from __future__ import annotations

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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.base}/api/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not healthy in {timeout}s:\n{self.log.read_text()}")

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
        assert ready.json()["data"]["position"].startswith("p2.")
        listed = httpx.get(f"{service.base}/api/tasks/", headers=bearer(new_user()), timeout=10)
        assert listed.status_code == 200 and listed.json()["meta"]["total"] == 0
    finally:
        assert service.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        assert "Traceback" not in service.log.read_text(), service.log.read_text()
