"""`python -m bench.cpu [--kinds create,update,complete] [-n 3000] [--rounds 3]`: CPU
time per command, in-process.

Saturation figures move with whatever else the machine runs; CPU time per request moves
much less. This calls each ASGI app directly (no socket, no uvicorn), one request at a
time, against a scratch database, and reports the process CPU time per request (median
of `--rounds`) for our command API and, in the same run, for the ceiling app's bare
insert: an A/B tool for changes to the command path, not a replacement for the
saturation figures (uvicorn's share, the same for both, is left out here, so the ratio
reads lower than the saturation ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bench.data import Databases
from bench.procs import db_init, master_key
from bench.run import DEFAULT_PG_URL
from shared import aio
from shared.auth import mint_token
from shared.settings import Settings

SECRET = "bench-cpu-" + "x" * 32
Call = Callable[[str, str, bytes], Awaitable[tuple[int, bytes]]]


async def started(app: Any) -> tuple[Call, asyncio.Task[None], asyncio.Queue[dict[str, Any]]]:
    """The app with its lifespan running, and a function that sends it one request."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    ready = asyncio.Event()
    inbox.put_nowait({"type": "lifespan.startup"})

    async def lifespan_send(message: dict[str, Any]) -> None:
        ready.set()

    life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                    inbox.get, lifespan_send))
    await ready.wait()
    headers: list[tuple[bytes, bytes]] = []

    async def call(method: str, path: str, body: bytes) -> tuple[int, bytes]:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2), "state": {},
            "headers": [*headers, (b"host", b"bench"), (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        }
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        status, chunks = 0, []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await app(scope, receive, send)
        return status, b"".join(chunks)

    call.headers = headers  # type: ignore[attr-defined]
    return call, life, inbox


async def measure(call: Call, request: Callable[[int], tuple[str, str, bytes]], n: int) -> float:
    """CPU seconds per request over n requests (after a warm-up)."""
    for i in range(min(200, n)):
        status, body = await call(*request(i))
        assert status < 300, (status, body)
    cpu = time.process_time()
    for i in range(n):
        status, body = await call(*request(i))
        assert status < 300, (status, body)
    return (time.process_time() - cpu) / n


async def run(url: str, kinds: list[str], n: int, rounds: int) -> dict[str, list[float]]:
    import asyncpg

    from bench import ceiling_app
    from command_api.app import create_app

    conn = await asyncpg.connect(url)
    for statement in ceiling_app.ddl():
        await conn.execute(statement)
    await conn.close()
    os.environ["BENCH_CEILING_DSN"] = url
    ceiling, ceiling_life, ceiling_inbox = await started(ceiling_app.create_app())
    settings = Settings(environment="test", database_url=url, better_auth_secret=SECRET,
                        data_master_key=master_key())  # db init ran as production: no dev key
    ours, ours_life, ours_inbox = await started(create_app(settings))
    user = f"bench-cpu-{uuid.uuid4().hex[:8]}"
    auth = (b"authorization", f"Bearer {mint_token(SECRET, user)}".encode())
    ours.headers.append(auth)  # type: ignore[attr-defined]
    lives = [(ceiling_life, ceiling_inbox), (ours_life, ours_inbox)]
    status, body = await ours("POST", "/api/tasks", b'{"title":"target"}')
    assert status == 201, body
    task = json.loads(body)["data"]["id"]

    requests: dict[str, Callable[[int], tuple[str, str, bytes]]] = {
        "insert (ceiling)": lambda i: (
            "POST", "/insert", json.dumps({"user_id": user, "title": f"t{i}"}).encode()),
        "create": lambda i: ("POST", "/api/tasks", json.dumps({"title": f"t{i}"}).encode()),
        "update": lambda i: ("PATCH", f"/api/tasks/{task}", json.dumps({"title": f"t{i}"}).encode()),
        "complete": lambda i: ("PATCH", f"/api/{user}/tasks/{task}/complete", b""),
    }
    runs = [("insert (ceiling)", ceiling, "insert (ceiling)")]
    for kind in kinds:
        runs.append((kind, ours, kind))
    results: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for _ in range(rounds):  # interleaved, so drift hits every kind alike
        for label, app, kind in runs:
            results[label].append(await measure(app, requests[kind], n))
    for life, inbox in lives:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(life, 10)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    p.add_argument("--kinds", default="create,update,complete")
    p.add_argument("-n", type=int, default=3000, help="requests per kind and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL))
    args = p.parse_args(argv)
    dbs = Databases(args.pg_url, prefix="taskservice_benchcpu")
    try:
        url = dbs.create()
        db_init(url)
        # On uvloop when installed, as uvicorn runs the servers.
        results = aio.run(lambda: run(url, args.kinds.split(","), args.n, args.rounds))
    finally:
        dbs.drop_all()
    base = statistics.median(results["insert (ceiling)"])
    print(f"CPU per request, in-process, median of {args.rounds} x {args.n} requests")
    print(f"{'kind':<26} {'us/request':>10} {'x ceiling':>10}  runs")
    for kind, values in results.items():
        m = statistics.median(values)
        runs = ", ".join(f"{v * 1e6:.0f}" for v in values)
        print(f"{kind:<26} {m * 1e6:>10.0f} {m / base:>10.2f}  [{runs}]")


if __name__ == "__main__":
    main()
