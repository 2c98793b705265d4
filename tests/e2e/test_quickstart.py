"""The README's two commands, on a fresh clone, with nothing but Python and make."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.fail("the quick start needs git and make on this machine")
    clone = tmp_path_factory.mktemp("quickstart") / "taskservice"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    return clone


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST"))}
    for name in ("DATABASE_URL", "BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "ENVIRONMENT"):
        env.pop(name, None)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p
    )
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def test_make_run_serves_the_api_on_an_embedded_database_with_demo_tokens(fresh_clone: Path):
    port = free_port()
    env = clean_env(PORT=str(port), TASKCTL_DATA_DIR=str(fresh_clone / ".data"))
    process = subprocess.Popen(
        ["make", "run"],
        cwd=fresh_clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        tokens: list[str] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(tokens) < 2:
            ready, _, _ = select.select([process.stdout], [], [], 1.0)
            if ready:
                line = process.stdout.readline()
                if not line and process.poll() is not None:
                    break
                output.append(line)
                match = re.search(r"export TOKEN=(\S+)", line)
                if match:
                    tokens.append(match.group(1))
        assert len(tokens) == 2, "".join(output)[-3000:]

        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=5) as client:
            for _ in range(100):
                try:
                    if client.get("/api/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            headers = {"Authorization": f"Bearer {tokens[0]}"}
            created = client.post("/api/tasks", json={"title": "from the quick start"}, headers=headers)
            assert created.status_code == 201, created.text
            assert created.json()["data"]["user_id"] == "11111111-1111-1111-1111-111111111111"
            unauthorised = client.post("/api/tasks", json={"title": "x"})
            assert unauthorised.status_code == 401
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # the embedded server it started is stopped again
    assert not (fresh_clone / ".data" / "postgres" / "postmaster.pid").exists() or _stopped(
        fresh_clone / ".data" / "postgres" / "postmaster.pid"
    )


def _stopped(pidfile: Path) -> bool:
    for _ in range(50):
        if not pidfile.exists():
            return True
        time.sleep(0.1)
    return False


def test_make_test_runs_the_suite_from_a_fresh_clone(fresh_clone: Path):
    # Only the unit tier inside the clone: the whole suite would run this test again.
    result = subprocess.run(
        ["make", "test", "PYTEST_ARGS=tests/unit -q -p no:cacheprovider"],
        cwd=fresh_clone,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]
