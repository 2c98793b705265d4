"""Real processes for the deployment tests: started on 127.0.0.1, output to a file,
bounded in time and always stopped by their own PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_binary(name: str, *candidates: str) -> str:
    """The path of a system binary the test needs; a missing one fails the test
    (`.ci/run` installs it), it never skips."""
    for path in (shutil.which(name), *candidates):
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(f"{name} is not installed (apt-get install {name}; .ci/run does it)")


class Proc:
    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            list(args), cwd=cwd, env=dict(env) if env is not None else None,
            stdout=self._out, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_http(self, url: str, timeout: float = 30, status: int = 200) -> httpx.Response:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output()}"
            try:
                last = httpx.get(url, timeout=2)
                if last.status_code == status:
                    return last
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{url} not {status} in {timeout}s ({last}):\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Signal the process (by its PID) and wait; SIGKILL if it does not exit."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            return self.proc.returncode
        finally:
            self._out.close()
