"""The APIs with and without PgBouncer (transaction mode) in front of PostgreSQL: one
benchmark row each. Not part of `python -m bench`.

    python -m bench.pgbouncer                       # 8 s per phase, 32 connections
    python -m bench.pgbouncer --seconds 3 --connections 16

On a fresh database of the server at --pg-url / BENCH_PG_URL (dropped at the end), for
each configuration in turn: `taskctl command-api` and `taskctl query-api` (pinned to the
server CPUs, like `python -m bench`), either straight to PostgreSQL or through a
PgBouncer of the harness's own (`tests/support/pgbouncer.py`: Debian's package, pool of
--pool-size server connections, also pinned) with `DB_TRANSACTION_POOLER=true`; the
projector always direct. Then a closed loop of --connections clients: creates (POST
/api/tasks) for --seconds, then reads of those tasks (GET /api/tasks/{id}) for
--seconds. Prints each row's requests/s and latency percentiles, and the server
connections each configuration held. Every process is stopped by its PID.

Both configurations run on a database with the settings docs/scaling.md gives for
PgBouncer (statement_timeout, idle_in_transaction_session_timeout, jit = off), so only
the pooler differs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg

from bench.http import Request, closed_loop
from bench.procs import Processes, db_init, free_port, master_key, split_cpus, taskctl
from bench.stats import latency_summary
from shared.auth import mint_token
from shared.settings import database_url

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
USERS = 50
DATABASE_SETTINGS = {"statement_timeout": "1500ms", "idle_in_transaction_session_timeout": "10s",
                     "jit": "off"}


def server_connections(url: str, database: str) -> int:
    with psycopg.connect(url) as conn:
        (n,) = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            (database,)).fetchone() or (0,)
    return int(n)


async def run_phases(command_port: int, query_port: int, tokens: list[str], seconds: float,
                     connections: int) -> dict[str, dict[str, object]]:
    created: list[tuple[str, str]] = []  # (token, task id)

    def remember(token: str):  # type: ignore[no-untyped-def]
        def then(resp, _now):  # type: ignore[no-untyped-def]
            created.append((token, resp.json()["data"]["id"]))
        return then

    def next_create(rng: random.Random) -> Request:
        token = rng.choice(tokens)
        return Request("create", "POST", "/api/tasks",
                       {"Authorization": f"Bearer {token}"},
                       {"title": f"bench {rng.random():.6f}"}, expect=(201,), then=remember(token))

    def next_get(rng: random.Random) -> Request:
        token, task_id = rng.choice(created)
        return Request("get", "GET", f"/api/tasks/{task_id}", {"Authorization": f"Bearer {token}"})

    rows: dict[str, dict[str, object]] = {}
    for kind, port, make in (("create", command_port, next_create), ("get", query_port, next_get)):
        if kind == "get":
            await asyncio.sleep(1.0)  # the projector catches up: reads wait for nothing
        result = await closed_loop(port, connections, seconds, make, warmup=1.0)
        ok = [s for s in result.samples if s.ok]
        errors = [s.error for s in result.samples if not s.ok]
        rows[kind] = {"requests_per_s": round(len(ok) / result.window, 1),
                      "errors": len(errors), "first_error": errors[0] if errors else None,
                      **latency_summary([s.latency for s in ok])}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pgbouncer")
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=10,
                        help="PgBouncer's server connections per database and role")
    parser.add_argument("--cpus", default=None, help='"GEN/SERVERS" as for python -m bench')
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.pgbouncer import PgBouncer  # the same runner the tests use

    gen_cpus, server_cpus = split_cpus(args.cpus)
    if gen_cpus:
        os.sched_setaffinity(0, gen_cpus)
    name = f"taskservice_bench_pgb_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    direct = database_url(args.pg_url, dbname=name)
    results: dict[str, object] = {"pool_size": args.pool_size, "connections": args.connections,
                                  "seconds": args.seconds}
    log_dir = Path(tempfile.mkdtemp(prefix="taskservice-bench-pgb-"))
    print(f"bench.pgbouncer: logs in {log_dir}", file=sys.stderr)
    bouncer = None
    try:
        db_init(direct)
        with psycopg.connect(direct, autocommit=True) as conn:
            for key, value in DATABASE_SETTINGS.items():
                conn.execute(f"ALTER DATABASE \"{name}\" SET {key} = '{value}'")
        bouncer = PgBouncer(args.pg_url, pool_size=args.pool_size, max_clients=1000)
        if server_cpus:
            os.sched_setaffinity(bouncer.pid, server_cpus)
        secret = secrets.token_urlsafe(48)
        tokens = [mint_token(secret, uuid.uuid4().hex, ttl_seconds=3600) for _ in range(USERS)]
        for label, url, pooled in (("direct", direct, False),
                                   ("pgbouncer", bouncer.url(name), True)):
            env = {"ENVIRONMENT": "production", "BETTER_AUTH_SECRET": secret,
                   "DATA_MASTER_KEY": master_key(),
                   "LOG_LEVEL": "WARNING", "METRICS_PORT": "0"}
            procs = Processes(log_dir / label, server_cpus, env)
            (log_dir / label).mkdir()
            try:
                api_env = {"DATABASE_URL": url, "DB_TRANSACTION_POOLER": str(pooled).lower()}
                cport, qport = free_port(), free_port()
                command = procs.start("command-api", [*taskctl(), "command-api", "--port", str(cport)],
                                      port=cport, env=api_env)
                query = procs.start("query-api", [*taskctl(), "query-api", "--port", str(qport)],
                                    port=qport, env=api_env)
                procs.start("projector", [*taskctl(), "projector", "--poll-interval", "1"],
                            env={"DATABASE_URL": direct})
                procs.wait_healthy(command, "/api/ready")
                procs.wait_healthy(query, "/api/ready")
                rows = asyncio.run(run_phases(cport, qport, tokens, args.seconds, args.connections))
                rows["server_connections"] = {"count": server_connections(args.pg_url, name)}
                results[label] = rows
            finally:
                procs.stop_all()
    finally:
        if bouncer is not None:
            bouncer.stop()
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("| configuration | create req/s | create p50 / p95 ms | get req/s | get p50 / p95 ms"
              " | server connections |\n|---|---|---|---|---|---|")
        for label in ("direct", "pgbouncer"):
            r = results[label]
            assert isinstance(r, dict)
            c, g = r["create"], r["get"]
            print(f"| {label} | {c['requests_per_s']} | {c['p50_ms']} / {c['p95_ms']}"
                  f" | {g['requests_per_s']} | {g['p50_ms']} / {g['p95_ms']}"
                  f" | {r['server_connections']['count']} |")
        errors = {k: (results[k]["create"]["errors"], results[k]["get"]["errors"])  # type: ignore[index]
                  for k in ("direct", "pgbouncer")}
        print(f"errors (create, get): {errors}")
    failed = any(results[k][p]["errors"] for k in ("direct", "pgbouncer")  # type: ignore[index]
                 for p in ("create", "get"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
