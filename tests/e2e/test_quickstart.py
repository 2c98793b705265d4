"""The README's two commands, on a fresh clone, with nothing but Python and make.

Run on the Python running the suite (CI runs the suite on the lowest and the highest
supported Python); as root, `make run` also runs once as an ordinary user (`nobody`,
through runuser). No DATABASE_URL: `make run` and the tests' database are the embedded
PostgreSQL, not the machine's server."""

from __future__ import annotations

import os
import pwd
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
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_python() -> str:
    """The interpreter behind this venv's python (what a new user would have)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def clone(into: Path) -> Path:
    if shutil.which("git") is None or shutil.which("make") is None:
        pytest.fail("the quick start needs git and make on this machine")
    target = into / "taskservice"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    return target


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clone(tmp_path_factory.mktemp("quickstart"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST"))}
    for name in ("DATABASE_URL", "BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "JWKS_URL",
                 "ENVIRONMENT", "TASKCTL_DATA_DIR", "PORT", "TASKSERVICE_TEST_PG",
                 # an outer `make test PYTHON=...` passes its variables down to every
                 # make below it, over the environment: the clone's make must pick its own
                 "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"):
        env.pop(name, None)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p
    )
    env["PYTHON"] = base_python()
    env.update(extra)
    return env


def make_run(checkout: Path, env: dict[str, str], prefix: tuple[str, ...] = ()) -> None:
    """`make run`: two demo tokens, a write with one, the embedded server stopped after."""
    port = int(env["PORT"])
    process = subprocess.Popen(
        [*prefix, "make", "run"],
        cwd=checkout,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output: list[str] = []
    try:
        tokens: list[str] = []
        deadline = time.monotonic() + 300
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
        assert "valid 24 h" in "".join(output)

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for _ in range(100):
                try:
                    if client.get("/api/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            headers = {"Authorization": f"Bearer {tokens[0]}"}
            created = client.post("/api/tasks", json={"title": "from the quick start"},
                                  headers=headers)
            assert created.status_code == 201, created.text
            assert created.json()["data"]["user_id"] == "11111111-1111-1111-1111-111111111111"
            assert client.post("/api/tasks", json={"title": "x"}).status_code == 401
    finally:
        # make's whole group, as a terminal's Ctrl-C would (the PGID is our child's PID)
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    pgdata = Path(env["TASKCTL_DATA_DIR"]) / "postgres" / "pgdata"
    assert (pgdata / "PG_VERSION").exists(), "".join(output)[-3000:]
    assert _stopped(pgdata / "postmaster.pid"), "the embedded PostgreSQL is still running"


def _stopped(pidfile: Path) -> bool:
    for _ in range(100):
        if not pidfile.exists():
            return True
        time.sleep(0.1)
    return False


def test_make_run_serves_the_api_on_an_embedded_database_with_demo_tokens(fresh_clone: Path):
    venv = f".venv-{sys.version_info[0]}{sys.version_info[1]}"
    make_run(fresh_clone, clean_env(PORT=str(free_port()), VENV=venv,
                                    TASKCTL_DATA_DIR=str(fresh_clone / f".data-{venv}")))


def test_make_test_runs_on_an_embedded_database_and_leaves_no_folder(
        fresh_clone: Path, tmp_path: Path):
    # The unit tier and one integration file inside the clone (the whole suite would run
    # this test again), on the embedded server even where the machine has one.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    venv = f".venv-{sys.version_info[0]}{sys.version_info[1]}"
    result = subprocess.run(
        ["make", "test", f"VENV={venv}",
         "PYTEST_ARGS=tests/unit tests/integration/test_dev_app.py -q -p no:cacheprovider"],
        cwd=fresh_clone,
        env=clean_env(TASKSERVICE_TEST_PG="embedded", TMPDIR=str(tmp)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout), result.stdout[-2000:]
    assert not list(tmp.glob("taskservice-test-pg-*")), list(tmp.iterdir())


def _python_for(user: str) -> str | None:
    for candidate in (base_python(), shutil.which("python3"), "/usr/bin/python3"):
        if candidate and subprocess.run(
                ["runuser", "-u", user, "--", candidate, "-c", "import venv"],
                capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="as root only: runs make run as an ordinary user through runuser")
def test_make_run_as_an_ordinary_user(tmp_path: Path):
    user = pwd.getpwnam("nobody")
    python = _python_for(user.pw_name)
    if python is None:
        pytest.skip("no Python that the user nobody may run")
    home = tmp_path / "home"
    home.mkdir()
    checkout = clone(home)
    for folder in (tmp_path, *tmp_path.parents):  # let nobody reach its home
        folder.chmod(folder.stat().st_mode | 0o001)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
    env = clean_env(PORT=str(free_port()), PYTHON=python, HOME=str(home),
                    TASKCTL_DATA_DIR=str(checkout / ".data"), PIP_CACHE_DIR=str(home / "pip"))
    make_run(checkout, env, prefix=("runuser", "-u", user.pw_name, "--"))
    owner = (checkout / ".data" / "postgres" / "pgdata").stat().st_uid
    assert owner == user.pw_uid
