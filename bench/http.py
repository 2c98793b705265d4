"""The load generator: a small asyncio HTTP/1.1 keep-alive client, an open-loop
scheduler (fixed arrival rate) and a closed-loop one (N connections, back to back).

Raw asyncio streams instead of httpx: httpx costs about ten times more CPU per request,
and on a two-core machine the generator must stay far below the servers' cost. Only
what the two APIs and the ceiling app send back is understood: `Content-Length` or
chunked bodies, keep-alive, `Connection: close`.

Latency in the open loop is measured from each request's *scheduled* send time, so a
generator or server that falls behind shows up in the percentiles (no coordinated
omission); how late requests actually left is reported as `send_lag`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"
REQUEST_TIMEOUT = 10.0


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(slots=True)
class Request:
    """One request to send: `kind` names it in the results; `expect` are the statuses
    counted as success; `then` runs after a successful response (e.g. remember an id)."""

    kind: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    expect: tuple[int, ...] = (200,)
    then: Callable[[Response, float], Awaitable[None] | None] | None = None


# uvicorn closes a kept-alive connection idle for 5 s (timeout_keep_alive); the client
# stops reusing one after this many seconds idle.
IDLE_LIMIT = 4.0


class Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.idle_since = time.monotonic()

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, req: Request) -> Response:
        reused = self.writer is not None
        try:
            return await self._send(req)
        except asyncio.IncompleteReadError as e:
            # A kept-alive connection the server closed while idle (uvicorn's keep-alive
            # timeout): nothing was answered, so a GET goes again on a new connection.
            if not (reused and not e.partial and req.method == "GET"):
                raise
            return await self._send(req)

    async def _send(self, req: Request) -> Response:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        body = b"" if req.body is None else json.dumps(req.body).encode()
        head = [f"{req.method} {req.path} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        head.extend(f"{k}: {v}" for k, v in req.headers.items())
        if body or req.method in ("POST", "PUT", "PATCH"):
            head.append("Content-Type: application/json")
            head.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        try:
            return await self._read(req.method)
        except BaseException:
            self.close()  # a half-read response poisons the connection
            raise

    async def _read(self, method: str) -> Response:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = b""
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(chunks)
        else:
            body = await self.reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return Response(status, headers, body)


class Pool:
    """Keep-alive connections to one port, opened on demand up to `size`."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.idle: deque[Connection] = deque()
        self.opened = 0
        self.waiters: deque[asyncio.Future[Connection]] = deque()

    async def acquire(self) -> Connection:
        if self.idle:
            conn = self.idle.pop()
            if time.monotonic() - conn.idle_since > IDLE_LIMIT:
                # The server may be closing it right now (keep-alive timeout): a write
                # sent into that race fails with nothing answered and cannot be resent
                # safely, so start on a fresh connection instead.
                conn.close()
            return conn
        if self.opened < self.size:
            self.opened += 1
            return Connection(self.port)
        future: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self.waiters.append(future)
        return await future

    def release(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        while self.waiters:
            future = self.waiters.popleft()
            if not future.done():
                future.set_result(conn)
                return
        self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


@dataclass
class Sample:
    kind: str
    latency: float  # seconds, from the scheduled (open loop) or actual (closed loop) start
    ok: bool
    status: int
    done_at: float
    error: str = ""


async def issue(pool: Pool, req: Request, started: float) -> Sample:
    conn = await pool.acquire()
    try:
        resp = await asyncio.wait_for(conn.send(req), REQUEST_TIMEOUT)
    except Exception as e:  # any failure is one errored request, counted
        conn.close()
        now = time.perf_counter()
        return Sample(req.kind, now - started, False, 0, now, f"{type(e).__name__}: {e}"[:200])
    finally:
        pool.release(conn)
    now = time.perf_counter()
    ok = resp.status in req.expect
    sample = Sample(req.kind, now - started, ok, resp.status, now)
    if not ok:
        sample.error = f"HTTP {resp.status}: {resp.body[:160].decode('utf-8', 'replace')}"
    elif req.then is not None:
        result = req.then(resp, now)
        if asyncio.iscoroutine(result):
            await result
    return sample


@dataclass
class OpenLoopResult:
    samples: list[Sample]
    send_lag: list[float]  # how late each request left, seconds
    elapsed: float


async def open_loop(
    rate: float,
    duration: float,
    next_request: Callable[[random.Random], tuple[Pool, Request]],
    *,
    seed: int = 1,
    drain_timeout: float = REQUEST_TIMEOUT + 5,
) -> OpenLoopResult:
    """Send `rate` requests a second for `duration` seconds, on schedule, whatever the
    responses do; wait for the stragglers (bounded)."""
    rng = random.Random(seed)
    n = int(rate * duration)
    interval = 1.0 / rate
    samples: list[Sample] = []
    lags: list[float] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(pool: Pool, req: Request, scheduled: float) -> None:
        samples.append(await issue(pool, req, scheduled))

    start = time.perf_counter() + 0.05
    for i in range(n):
        scheduled = start + i * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, time.perf_counter() - scheduled))
        pool, req = next_request(rng)
        task = asyncio.create_task(one(pool, req, scheduled))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        _, late = await asyncio.wait(set(pending), timeout=drain_timeout)
        for task in late:
            task.cancel()
    return OpenLoopResult(samples, lags, time.perf_counter() - start)


@dataclass
class ClosedLoopResult:
    samples: list[Sample]
    window: float  # seconds of the measured window
    exhausted: bool = False


async def closed_loop(
    port: int,
    connections: int,
    duration: float,
    next_request: Callable[[random.Random], Request | None],
    *,
    warmup: float = 1.0,
    seed: int = 2,
) -> ClosedLoopResult:
    """`connections` clients, each sending its next request as soon as the last one
    answered, for `warmup + duration` seconds; what completes inside the measured window
    (after the warm-up) counts. `next_request` returning None ends a client early (data
    ran out)."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    exhausted = False
    begin = time.perf_counter()
    measure_from = begin + warmup
    end = measure_from + duration

    async def client() -> None:
        nonlocal exhausted
        pool = Pool(port, 1)
        try:
            while time.perf_counter() < end:
                req = next_request(rng)
                if req is None:
                    exhausted = True
                    return
                sample = await issue(pool, req, time.perf_counter())
                if measure_from <= sample.done_at <= end:
                    samples.append(sample)
        finally:
            pool.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    window = (max((s.done_at for s in samples), default=end) if exhausted else end) - measure_from
    return ClosedLoopResult(samples, max(window, 1e-6), exhausted)
