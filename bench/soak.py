"""Soak: many concurrent users for a while through the real processes; zero errors and
nothing lost.

    python -m bench.soak                      # 100 users for 60 s (the documented run)
    python -m bench.soak --users 20 --seconds 5

Starts `taskctl command-api`, `taskctl query-api` and `taskctl projector` (127.0.0.1,
free ports, stopped by PID at the end) on a fresh database of the PostgreSQL at
--pg-url / BENCH_PG_URL (dropped at the end unless --keep). Each user, in a closed loop:
creates a task (with an Idempotency-Key), renames or toggles one of their tasks
(If-Match with the ETag they hold), reads one back (no header: a read reflects its
user's own acknowledged writes), and now and then lists their tasks. Any status other than the expected one is an error. At the end:
every acknowledged write (task id, version) is in the event store, and each user's list
in the query API, read once more, shows exactly their tasks at the
versions they were last told. Exit status 0 only if errors == 0 and nothing is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from bench.procs import Processes, free_port, master_key, taskctl
from shared.auth import mint_token

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class User:
    id: str
    token: str
    tasks: dict[str, int] = field(default_factory=dict)  # task id -> last acknowledged version

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}


@dataclass
class Stats:
    ok: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    acknowledged: set[tuple[str, int]] = field(default_factory=set)

    def record(self, kind: str, response: httpx.Response | None, expected: int, started: float,
               error: str = "") -> bool:
        if response is not None and response.status_code == expected:
            self.ok[kind] += 1
            self.latencies.setdefault(kind, []).append(time.perf_counter() - started)
            return True
        status = response.status_code if response is not None else error
        self.errors[f"{kind} {status}"] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{kind}: {status} {response.text[:300] if response is not None else ''}")
        return False


async def call(stats: Stats, client: httpx.AsyncClient, kind: str, expected: int, method: str,
               url: str, **kw: object) -> httpx.Response | None:
    started = time.perf_counter()
    try:
        response = await client.request(method, url, **kw)
    except httpx.HTTPError as e:
        stats.record(kind, None, expected, started, type(e).__name__)
        return None
    return response if stats.record(kind, response, expected, started) else None


async def user_loop(user: User, command: httpx.AsyncClient, query: httpx.AsyncClient,
                    stats: Stats, until: float, rng: random.Random) -> None:
    n = 0
    while time.monotonic() < until:
        n += 1
        r = await call(stats, command, "create", 201, "POST", "/api/tasks",
                       json={"title": f"soak {n}", "description": "x" if n % 3 else None},
                       headers=user.headers(**{"Idempotency-Key": f"soak-{n}"}))
        if r is not None:
            task = r.json()["data"]
            user.tasks[task["id"]] = task["version"]
            stats.acknowledged.add((task["id"], task["version"]))
        if user.tasks:
            task_id = rng.choice(list(user.tasks))
            etag = f'"v{user.tasks[task_id]}"'
            if rng.random() < 0.5:
                r = await call(stats, command, "rename", 200, "PATCH", f"/api/tasks/{task_id}",
                               json={"title": f"renamed {n}"}, headers=user.headers(**{"If-Match": etag}))
            else:
                r = await call(stats, command, "toggle", 200, "PATCH",
                               f"/api/{user.id}/tasks/{task_id}/complete",
                               headers=user.headers(**{"If-Match": etag}))
            if r is not None:
                version = r.json()["data"]["version"]
                user.tasks[task_id] = version
                stats.acknowledged.add((task_id, version))
            r = await call(stats, query, "get", 200, "GET", f"/api/tasks/{task_id}",
                           headers=user.headers())
            if r is not None:
                body = r.json()
                if body["meta"].get("stale") or body["data"]["version"] != user.tasks[task_id]:
                    stats.errors["get stale"] += 1
        if n % 5 == 0:
            await call(stats, query, "list", 200, "GET", "/api/tasks", params={"limit": 50},
                       headers=user.headers())


async def verify(users: list[User], query: httpx.AsyncClient, stats: Stats, db_url: str) -> dict:
    with psycopg.connect(db_url) as conn:
        stored = {(str(a), b) for a, b in conn.execute(
            "SELECT originator_id, originator_version FROM tasks_events").fetchall()}
    missing_events = len(stats.acknowledged - stored)
    missing_reads = 0
    for user in users:
        r = await query.get("/api/tasks", headers=user.headers())
        body = r.json()
        seen = {t["id"]: t["version"] for t in body["data"]} if r.status_code == 200 else {}
        if r.status_code != 200 or body["meta"].get("stale") or seen != user.tasks:
            missing_reads += 1
    return {"acknowledged_writes": len(stats.acknowledged), "missing_in_event_store": missing_events,
            "users_whose_list_differs": missing_reads}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def drive(args: argparse.Namespace, command_url: str, query_url: str, secret: str,
                db_url: str) -> dict:
    rng = random.Random(args.seed)
    users = [User(uuid.uuid4().hex, "") for _ in range(args.users)]
    for u in users:
        u.token = mint_token(secret, u.id, ttl_seconds=3600)
    stats = Stats()
    limits = httpx.Limits(max_connections=args.users + 10, max_keepalive_connections=args.users + 10)
    async with httpx.AsyncClient(base_url=command_url, timeout=30, limits=limits) as command, \
            httpx.AsyncClient(base_url=query_url, timeout=30, limits=limits) as query:
        started = time.monotonic()
        until = started + args.seconds
        await asyncio.gather(*(user_loop(u, command, query, stats, until,
                                         random.Random(rng.random())) for u in users))
        elapsed = time.monotonic() - started
        checks = await verify(users, query, stats, db_url)
    requests = sum(stats.ok.values()) + sum(stats.errors.values())
    return {
        "users": args.users, "seconds": round(elapsed, 1), "requests": requests,
        "requests_per_second": round(requests / elapsed, 1), "ok": dict(stats.ok),
        "errors": dict(stats.errors), "error_samples": stats.samples,
        "p50_ms": {k: round(statistics.median(v) * 1000, 1) for k, v in stats.latencies.items()},
        "p99_ms": {k: round(percentile(v, 99) * 1000, 1) for k, v in stats.latencies.items()},
        **checks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG))
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args(argv)

    name = f"taskservice_soak_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = args.pg_url.rsplit("/", 1)[0] + f"/{name}"
    secret = secrets.token_urlsafe(48)
    log_dir = Path(tempfile.mkdtemp(prefix="taskservice-soak-"))
    env = {"DATABASE_URL": db_url, "ENVIRONMENT": "production", "BETTER_AUTH_SECRET": secret,
           "DATA_MASTER_KEY": master_key(),
           "LOG_LEVEL": "WARNING"}
    procs = Processes(log_dir, None, env)
    try:
        init = procs.start("db-init", [*taskctl(), "db", "init"])
        assert init.popen is not None
        if init.popen.wait(60) != 0:
            raise RuntimeError(init.tail())
        cport, qport = free_port(), free_port()
        command = procs.start("command-api", [*taskctl(), "command-api", "--host", "127.0.0.1",
                                              "--port", str(cport)], port=cport)
        query = procs.start("query-api", [*taskctl(), "query-api", "--host", "127.0.0.1",
                                          "--port", str(qport)], port=qport)
        projector = procs.start("projector", [*taskctl(), "projector"])
        procs.wait_healthy(command, "/api/ready")
        procs.wait_healthy(query, "/api/ready")
        result = asyncio.run(drive(args, f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{qport}",
                                   secret, db_url))
        result["processes_alive"] = all(p.alive() for p in (command, query, projector))
    finally:
        procs.stop_all()
        if not args.keep:
            with psycopg.connect(args.pg_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    passed = (not result["errors"] and result["missing_in_event_store"] == 0
              and result["users_whose_list_differs"] == 0 and result["processes_alive"])
    result["passed"] = passed
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
        print(f"logs: {log_dir}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
