"""A key server in its own process, as Better Auth is one: it serves a JWKS at
`/api/auth/jwks` on 127.0.0.1 and behaves as its state file says, read on every request
(the keys, an HTTP status, a body trickled byte by byte), and counts its requests in a
file. It also stubs Better Auth's `/api/auth/get-session`: the state's `sessions` map a
bearer token to the answer (else `null`, as Better Auth answers for no session). The test stops it (an outage) and starts it again on the same port (the return).

Run as `python -m tests.support.keyserver PORT FOLDER`; `KeyServer` drives it."""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

JWKS_PATH = "/api/auth/jwks"
SESSION_PATH = "/api/auth/get-session"


def _serve(port: int, folder: Path) -> None:
    state_file, log_file = folder / "state.json", folder / "requests.log"
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            with lock:
                with log_file.open("a") as log:
                    log.write(f"{time.time():.3f} {self.path}\n")
                state = json.loads(state_file.read_text())
            body = json.dumps({"keys": state["keys"]}).encode()
            status = state.get("status", 200)
            if state.get("body") is not None:
                body = state["body"].encode()
            if self.path.split("?")[0] == SESSION_PATH:
                token = (self.headers.get("authorization") or "").partition(" ")[2]
                body = json.dumps(state.get("sessions", {}).get(token)).encode()
                status = state.get("session_status", 200)
            elif self.path != JWKS_PATH:
                status, body = 404, b"{}"
            trickle = state.get("trickle")  # seconds between bytes
            if trickle and state.get("trickle_headers"):
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: ":
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(trickle)
                while True:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(trickle)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if trickle:
                for byte in body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(trickle)
            else:
                self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    (folder / "listening").write_text(str(port))
    server.serve_forever(poll_interval=0.05)


class KeyServer:
    """Starts, stops and steers the key-server process; `requests` counts its fetches."""

    def __init__(self, folder: Path, port: int) -> None:
        from tests.support.process import Proc  # noqa: PLC0415 - not in the server process

        self._proc_type = Proc
        self.folder, self.port = folder, port
        self.proc: Any = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._state: dict[str, Any] = {"keys": [], "status": 200}
        self._write()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_url(self) -> str:
        return self.base_url + JWKS_PATH

    def _write(self) -> None:
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(self._state))
        tmp.replace(self.folder / "state.json")

    def set(self, **state: Any) -> None:
        self._state.update(state)
        self._write()

    def publish(self, *jwks: dict[str, Any]) -> None:
        self.set(keys=[*self._state["keys"], *jwks])

    @property
    def requests(self) -> int:
        return len(self.paths())

    def paths(self) -> list[str]:
        """The path of each request so far, oldest first."""
        log = self.folder / "requests.log"
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split(" ", 1)[1] for line in lines]

    def start(self) -> KeyServer:
        (self.folder / "listening").unlink(missing_ok=True)
        self.proc = self._proc_type(
            [sys.executable, "-m", "tests.support.keyserver", str(self.port), str(self.folder)],
            self.folder / "server.log")
        deadline = time.monotonic() + 15
        while not (self.folder / "listening").exists():
            assert self.proc.proc.poll() is None, self.proc.output()
            assert time.monotonic() < deadline, "the key server did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=5)
            self.proc = None


if __name__ == "__main__":
    _serve(int(sys.argv[1]), Path(sys.argv[2]))
