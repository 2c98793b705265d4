"""The processes the benchmark starts: free ports, CPU pinning, start, wait, stop.

Every process is started in its own session (so its PID is its process group),
listens on 127.0.0.1 only, writes its output to a log file, and is stopped by the
harness by that PID: SIGTERM, then SIGKILL after a bounded wait.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split_cpus(spec: str | None) -> tuple[set[int] | None, set[int] | None]:
    """(generator cpus, server cpus). `spec` is "GEN/SERVERS" like "0/1" or "0/1-3",
    "none" for no pinning, or None for the default: the first quarter of the cores
    (at least one) for the generator, the rest for the servers."""
    available = sorted(os.sched_getaffinity(0))
    if spec == "none" or len(available) < 2:
        return None, None
    if spec:
        gen, _, servers = spec.partition("/")
        return _cpu_list(gen), _cpu_list(servers)
    n_gen = max(1, len(available) // 4)
    return set(available[:n_gen]), set(available[n_gen:])


def _cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def taskctl() -> list[str]:
    script = Path(sys.executable).with_name("taskctl")
    return [str(script)] if script.exists() else [sys.executable, "-m", "taskctl"]


def pinned(cpus: Iterable[int], argv: Sequence[str]) -> list[str]:
    """`argv`, run on `cpus` (`bench.pin` sets the affinity before exec; one more
    interpreter start-up, ~30 ms, in a wall time)."""
    return [sys.executable, "-m", "bench.pin", ",".join(str(c) for c in sorted(cpus)), "--",
            *argv]


def unpinned(argv: Sequence[str]) -> list[str]:
    """`argv`, run on every CPU of the machine: a child inherits its parent's affinity,
    and the harness pins itself to the generator's CPUs."""
    return pinned(range(os.cpu_count() or 1), argv)


def master_key() -> str:
    """The benchmark's DATA_MASTER_KEY (shared/datakeys.py): made once per run and set in
    this process too, so its children and its own readers of sealed events agree."""
    return os.environ.setdefault("DATA_MASTER_KEY", secrets.token_urlsafe(32))


def db_init(database_url: str) -> None:
    """`taskctl db init` on `database_url`, as an operator runs it (the CLI package is
    run, never imported)."""
    env = {**os.environ, "DATABASE_URL": database_url}
    done = subprocess.run([*taskctl(), "db", "init"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"taskctl db init failed: {done.stderr.strip() or done.stdout}")


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    port: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return None if self.popen is None else self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Processes:
    """Starts processes pinned to `cpus` and stops every one of them, by PID."""

    def __init__(self, log_dir: Path, cpus: set[int] | None, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.cpus = cpus
        self.env = env
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], *, port: int | None = None,
              env: dict[str, str] | None = None) -> Proc:
        command = pinned(self.cpus, argv) if self.cpus else list(argv)
        log_path = self.log_dir / f"{name}.log"
        proc = Proc(name, command, log_path, port)
        full_env = {**os.environ, **self.env, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
        )
        with open(log_path, "wb") as log:
            proc.popen = subprocess.Popen(
                command, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        proc.started_at = time.monotonic()
        self.procs.append(proc)
        return proc

    def wait_healthy(self, proc: Proc, path: str = "/api/health", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{proc.port}{path}"
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{proc.name} not healthy after {timeout}s:\n{proc.tail()}")

    def stop(self, proc: Proc, timeout: float = 15) -> None:
        if proc.popen is None or proc.popen.poll() is not None:
            return
        try:
            os.killpg(proc.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.popen.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


def serve_variant(prog: str, app_path: str) -> None:
    """`python -m bench.<variant> --port N`: the uvicorn factory `app_path` served exactly
    as `taskctl command-api` / `query-api` serve theirs (`shared.serving.serve`), so a
    comparison with them is of the apps alone. Settings from the environment."""
    import argparse

    from shared.serving import serve
    from shared.settings import Settings

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(app_path, args.host, args.port, Settings.from_env())
