"""The direct path: `taskctl command-api` (uvicorn, shared.serving) on 127.0.0.1, driven
with raw sockets. Malformed HTTP gets the envelope; oversized headers a 431; a client that
sends nothing, trickles its headers or trickles its body is answered (408) or dropped
within the deadlines, and a body that never completes is never executed. Short deadlines
(HTTP_HEADER_TIMEOUT=1, HTTP_BODY_TIMEOUT=1.5) keep every case under a few seconds."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shared.serving import MAX_HEADER_BYTES
from tests.integration.test_truncated_bodies import events_by
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.process import Proc, free_port

pytestmark = pytest.mark.slow
HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5
SLACK = 2.5  # the most a deadline may be overrun by here (a loaded 2-core machine)


@dataclass
class Api:
    port: int
    proc: Proc
    database_url: str


@pytest.fixture(scope="module")
def api(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "ENVIRONMENT": "test",
           "BETTER_AUTH_SECRET": TEST_SECRET, "LOG_LEVEL": "INFO",
           "HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "HTTP_BODY_TIMEOUT": str(BODY_TIMEOUT)}
    log = tmp_path_factory.mktemp("direct") / "command-api.log"
    proc = Proc([sys.executable, "-m", "taskctl.cli", "command-api", "--host", "127.0.0.1",
                 "--port", str(port)], log, env)
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/api/health")
        yield Api(port, proc, database_url)
    finally:
        proc.stop()
    assert "Traceback" not in proc.output(), proc.output()


@dataclass
class Answer:
    raw: bytes
    elapsed: float  # from the first byte sent (or the connection) to the close
    closed: bool  # the server closed the connection

    @property
    def status(self) -> int:
        return int(self.raw.split(b" ", 2)[1])

    @property
    def headers(self) -> dict[str, str]:
        head = self.raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head)}

    def json(self) -> dict:
        return json.loads(self.raw.split(b"\r\n\r\n", 1)[1])


def converse(port: int, first: bytes, trickle: bytes = b"", gap: float = 0.25,
             limit: float = 10.0) -> Answer:
    """Send `first`, then `trickle` one byte every `gap` seconds, reading all along; the
    answer once the server closes (or `limit` seconds pass: closed=False)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
    sock.settimeout(gap)
    start = time.monotonic()
    raw, closed = b"", False
    try:
        if first:
            sock.sendall(first)
        pending = iter(trickle)
        while time.monotonic() - start < limit:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                byte = next(pending, None)
                if byte is not None:
                    try:
                        sock.sendall(bytes([byte]))
                    except OSError:  # closed under us: read what was answered
                        pass
                continue
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            raw += chunk
    finally:
        sock.close()
    return Answer(raw, time.monotonic() - start, closed)


def assert_envelope(answer: Answer, status: int, code: str) -> dict:
    assert answer.closed, answer
    assert answer.status == status, answer.raw[:300]
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    body = answer.json()
    assert body["error"]["code"] == code
    assert body["detail"] == body["error"]["message"]
    assert body["meta"]["request_id"] == answer.headers["x-request-id"]
    return body


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET /api/health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /api/health HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
], ids=["request-line", "header-line", "version", "content-length", "chunk-size",
        "two-lengths"])
def test_malformed_http_gets_the_400_envelope(api: Api, request_bytes: bytes):
    answer = converse(api.port, request_bytes)
    body = assert_envelope(answer, 400, "BAD_REQUEST")
    assert body["error"]["message"] == "Malformed HTTP request"
    assert answer.elapsed < SLACK


def test_headers_over_the_limit_get_431_and_a_large_token_does_not(api: Api):
    big = (b"GET /api/tasks HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 1)
           + b"\r\n\r\n")
    assert_envelope(converse(api.port, big), 431, "HEADERS_TOO_LARGE")
    # A 16 KiB token (Better Auth's default payload can be large) is the API's to judge.
    token = b"Authorization: Bearer " + b"a" * 16_384 + b"\r\n"
    answer = converse(api.port, b"POST /api/tasks HTTP/1.1\r\nHost: x\r\n" + token
                      + b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert answer.status == 401, answer.raw[:300]


def test_a_connection_that_sends_nothing_is_closed(api: Api):
    answer = converse(api.port, b"")
    assert answer.closed and answer.raw == b""
    assert HEADER_TIMEOUT * 0.8 <= answer.elapsed < HEADER_TIMEOUT + SLACK


def test_trickled_headers_get_408(api: Api):
    answer = converse(api.port, b"GET /api/health HTTP/1.1\r\n",
                      trickle=b"Host: example.com\r\nX-Slow: " + b"s" * 100)
    body = assert_envelope(answer, 408, "REQUEST_TIMEOUT")
    assert "headers" in body["error"]["message"]
    assert answer.elapsed < HEADER_TIMEOUT + SLACK


def test_a_kept_alive_connection_then_trickling_its_next_request_gets_408(api: Api):
    first = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = converse(api.port, first, trickle=b"GET /api/health HTTP/1.1\r\nHost: x" + b"x" * 50)
    assert answer.raw.startswith(b"HTTP/1.1 200 "), answer.raw[:200]  # the first, kept alive
    second = Answer(answer.raw[answer.raw.index(b"HTTP/1.1 408"):], answer.elapsed, answer.closed)
    assert_envelope(second, 408, "REQUEST_TIMEOUT")
    # ...and blank lines between requests do not keep a connection either.
    idle = converse(api.port, first, trickle=b"\r\n" * 60)
    assert idle.closed and idle.elapsed < HEADER_TIMEOUT + 5 + SLACK  # keep-alive 5 s at most


def test_a_trickled_body_gets_408_and_is_never_executed(api: Api):
    user = new_user()
    body = json.dumps({"title": "trickled", "description": "d" * 40}).encode()
    auth = bearer(user)["Authorization"].encode()
    request_id = f"slow-{uuid.uuid4().hex[:8]}"
    head = (b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
            + b"\r\nContent-Type: application/json\r\nX-Request-ID: " + request_id.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    answer = converse(api.port, head + body[:10], trickle=body[10:], gap=0.3)
    envelope = assert_envelope(answer, 408, "REQUEST_TIMEOUT")
    assert "body" in envelope["error"]["message"]
    assert answer.headers["x-request-id"] == request_id
    assert BODY_TIMEOUT * 0.8 <= answer.elapsed < BODY_TIMEOUT + SLACK
    assert events_by(api.database_url, user) == 0
    # The same body sent at once is executed: the deadline is the only difference.
    done = converse(api.port, head.replace(b"Host: x", b"Host: x\r\nConnection: close") + body)
    assert done.status == 201, done.raw[:300]
    assert events_by(api.database_url, user) == 1


def test_the_rest_of_a_body_answered_early_is_bounded_too(api: Api):
    head = (b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n")
    answer = converse(api.port, head + b"{", trickle=b" " * 100, gap=0.2)
    assert answer.status == 413, answer.raw[:300]  # answered at once, from Content-Length
    assert answer.closed and answer.elapsed < BODY_TIMEOUT + SLACK


def test_requests_at_a_normal_pace_keep_their_connection(api: Api):
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=5)
    try:
        with sock.makefile("rb") as replies:
            for _ in range(3):
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
                status = replies.readline()
                assert status.startswith(b"HTTP/1.1 200 "), status
                length = 0
                while (line := replies.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                replies.read(length)
                time.sleep(HEADER_TIMEOUT * 0.6)  # idle, under every deadline
    finally:
        sock.close()


def test_the_log_says_what_was_refused(api: Api):
    converse(api.port, b"GET /api/health HTTP/1.1\r\n", trickle=b"Host: x" * 10)
    deadline = time.monotonic() + 5
    while "request headers not complete within 1 s (408)" not in api.proc.output():
        assert time.monotonic() < deadline, api.proc.output()[-2000:]
        time.sleep(0.1)
