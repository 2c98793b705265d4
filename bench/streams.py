"""`python -m bench.streams`: many open live streams on one query-API process while
commands arrive at a steady rate; how fast each change reaches every stream, and what
the streams cost the query API, against the same load with no stream open.

    python -m bench.streams                          # the documented run: 1,000 streams,
                                                     # 100 commands/s, 30 s per phase
    python -m bench.streams --streams 50 --users 25 --seconds 3   # a smoke run (~20 s)

Not part of `python -m bench` (it would add a minute and a half to it). Starts
`taskctl command-api`, `taskctl query-api` and `taskctl projector` on a fresh database
of --pg-url / BENCH_PG_URL (dropped at the end unless --keep), the servers pinned as
`python -m bench` pins them (generator on the first quarter of the cores, servers on
the rest; --cpus). Then two phases of the same open-loop load, `--rate` creates per
second spread over `--users` users for `--seconds`:

1. **no streams**: the query API's CPU (% of one core) and memory (RSS) while it holds
   nothing but its idle watch;
2. **streams**: `--streams` streams open (`--streams / --users` per user, each an
   HTTP/1.1 connection of this process reading `text/event-stream`), all `ready`, then
   the same load. Delivery latency: from the command's acknowledgement (its 201 read
   here) to the change's event read here on each stream of its user (the event's `id:`
   is the command's `X-Position`), p50/p95/p99; every expected delivery counted, a
   missing or repeated one is an error.

Prints a JSON document (also `--json PATH`); exit status 0 only if every change reached
every stream of its user exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import data
from bench.procs import Processes, db_init, free_port, master_key, split_cpus, taskctl
from bench.run import DEFAULT_PG_URL, machine_info
from bench.stats import CpuMeter, latency_summary
from shared.auth import mint_token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=1000, help="open streams (default 1000)")
    p.add_argument("--users", type=int, default=500, help="users they belong to (default 500)")
    p.add_argument("--rate", type=float, default=100.0, help="creates per second (default 100)")
    p.add_argument("--seconds", type=float, default=30.0, help="each phase's load (default 30)")
    p.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL))
    p.add_argument("--cpus", default=None, help='"GEN/SERVERS" like 0/1, or none')
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the database and the logs")
    return p


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# -- one stream ----------------------------------------------------------------------


@dataclass
class Stream:
    user: int
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    seen: Counter[str] = field(default_factory=Counter)
    arrivals: dict[str, float] = field(default_factory=dict)
    ended: str | None = None
    task: asyncio.Task[None] | None = None


async def follow(stream: Stream, host: str, port: int, token: str) -> None:
    """Read one stream (chunked HTTP/1.1; the API writes one event per chunk) until it
    ends or is cancelled: the time each `task` event's id arrived."""
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET /api/tasks/stream HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer"
                     f" {token}\r\nAccept: text/event-stream\r\n\r\n".encode())
        status = await reader.readline()
        if b" 200 " not in status:
            stream.ended = status.decode(errors="replace").strip()
            return
        while (await reader.readline()).strip():
            pass  # the headers
        pending = b""
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                stream.ended = stream.ended or "closed"
                return
            pending += await reader.readexactly(size + 2)
            pending = pending[:-2]
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                now = time.monotonic()
                fields = dict(line.split(b": ", 1) for line in event.split(b"\n")
                              if b": " in line and not line.startswith(b":"))
                kind = fields.get(b"event")
                if kind == b"task":
                    position = fields[b"id"].decode()
                    stream.seen[position] += 1
                    stream.arrivals.setdefault(position, now)
                elif kind == b"ready":
                    stream.ready.set()
                elif kind == b"end":
                    stream.ended = fields.get(b"data", b"").decode()
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        stream.ended = stream.ended or repr(e)
    finally:
        if writer is not None:
            writer.close()


# -- the load ------------------------------------------------------------------------


async def load(base: str, tokens: list[str], rate: float, seconds: float
               ) -> tuple[list[tuple[int, str, float]], int]:
    """`rate` creates per second for `seconds`, open loop, round robin over the users:
    (user, position, acknowledged at) of each acknowledged one, and the errors."""
    acknowledged: list[tuple[int, str, float]] = []
    errors = 0
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:

        async def one(i: int) -> None:
            nonlocal errors
            user = i % len(tokens)
            try:
                response = await client.post(
                    "/api/tasks", json={"title": f"streamed {i}"},
                    headers={"Authorization": f"Bearer {tokens[user]}"})
            except httpx.HTTPError:
                errors += 1
                return
            if response.status_code != 201:
                errors += 1
                return
            acknowledged.append((user, response.headers["X-Position"], time.monotonic()))

        start = time.monotonic()
        pending = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one(i)))
        await asyncio.gather(*pending)
    return acknowledged, errors


# -- the run -------------------------------------------------------------------------


def say(text: str) -> None:
    print(f"[bench.streams {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def measure(args: argparse.Namespace, command: str, query_port: int,
                  pids: dict[str, int], tokens: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    query_pid = pids["query-api"]

    say(f"phase 1: {args.rate:g} creates/s for {args.seconds:g}s, no stream open")
    idle_rss = rss_mb(query_pid)
    with CpuMeter(pids) as cpu:
        acknowledged, errors = await load(command, tokens, args.rate, args.seconds)
    results["no_streams"] = {
        "commands": len(acknowledged), "command_errors": errors,
        "query_api_rss_mb": rss_mb(query_pid), "query_api_rss_mb_before": idle_rss,
        "cpu": cpu.result,
    }

    per_user = max(1, args.streams // args.users)
    say(f"phase 2: opening {args.streams} streams ({per_user} per user)")
    streams = [Stream(user=i % args.users) for i in range(args.streams)]
    opened = time.monotonic()
    for s in streams:
        s.task = asyncio.create_task(follow(s, "127.0.0.1", query_port, tokens[s.user]))
    try:
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in streams)), 120)
    except TimeoutError:
        not_ready = [s.ended for s in streams if not s.ready.is_set()]
        raise RuntimeError(f"{len(not_ready)} streams not ready: {Counter(not_ready)}") from None
    open_seconds = time.monotonic() - opened
    await asyncio.sleep(2)  # settle
    open_rss = rss_mb(query_pid)
    say(f"{args.streams} streams ready in {open_seconds:.1f}s; the same load")
    with CpuMeter(pids) as cpu:
        acknowledged, errors = await load(command, tokens, args.rate, args.seconds)
    await asyncio.sleep(3)  # the last changes' way to the streams
    loaded_rss = rss_mb(query_pid)
    for s in streams:
        assert s.task is not None
        s.task.cancel()
    await asyncio.gather(*(s.task for s in streams if s.task), return_exceptions=True)

    by_user: dict[int, list[Stream]] = {}
    for s in streams:
        by_user.setdefault(s.user, []).append(s)
    latencies, missing, repeated = [], 0, 0
    for user, position, at in acknowledged:
        for s in by_user.get(user, ()):
            count = s.seen.get(position, 0)
            if count == 0:
                missing += 1
                continue
            repeated += count - 1
            latencies.append(s.arrivals[position] - at)
    ended = Counter(s.ended for s in streams if s.ended)
    results["streams"] = {
        "streams": args.streams, "users": args.users, "streams_per_user": per_user,
        "open_seconds": round(open_seconds, 2),
        "commands": len(acknowledged), "command_errors": errors,
        "deliveries": len(latencies), "missing": missing, "repeated": repeated,
        "ended_early": dict(ended),
        "delivery": latency_summary(latencies),
        "delivery_min_ms": round(min(latencies) * 1000, 2) if latencies else None,
        "query_api_rss_mb_open_idle": open_rss, "query_api_rss_mb_after_load": loaded_rss,
        "cpu": cpu.result,
    }
    base_rss = results["no_streams"]["query_api_rss_mb"]
    if open_rss and base_rss:
        results["streams"]["rss_kb_per_stream"] = round(
            (open_rss - base_rss) * 1024 / args.streams, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gen_cpus, server_cpus = split_cpus(args.cpus)
    if gen_cpus:
        os.sched_setaffinity(0, gen_cpus)
    log_dir = Path(tempfile.mkdtemp(prefix="taskservice-bench-streams-"))
    dbs = data.Databases(args.pg_url, prefix="taskservice_bench_streams")
    secret = secrets.token_urlsafe(48)
    procs: Processes | None = None
    say(f"logs in {log_dir}")
    try:
        url = dbs.create()
        db_init(url)
        per_user = max(1, args.streams // args.users)
        env = {"DATABASE_URL": url, "BETTER_AUTH_SECRET": secret, "ENVIRONMENT": "production",
               "DATA_MASTER_KEY": master_key(),
               "LOG_LEVEL": "WARNING", "STREAM_MAX_PER_USER": str(max(10, per_user)),
               "STREAM_MAX_PER_PROCESS": str(max(2000, args.streams))}
        procs = Processes(log_dir, server_cpus, env)
        tc = taskctl()
        servers = {"projector": procs.start("projector", [*tc, "projector",
                                                          "--metrics-port", "0"])}
        for name in ("command-api", "query-api"):
            port = free_port()
            servers[name] = procs.start(name, [*tc, name, "--host", "127.0.0.1", "--port",
                                               str(port)], port=port)
            procs.wait_healthy(servers[name])
        pids = {name: p.pid for name, p in servers.items() if p.pid is not None}
        pids["generator"] = os.getpid()
        tokens = [mint_token(secret, uuid.uuid4().hex, ttl_seconds=3600)
                  for _ in range(args.users)]
        command = f"http://127.0.0.1:{servers['command-api'].port}"
        query_port = servers["query-api"].port
        assert query_port is not None
        results = {
            "run": {"command": "python -m bench.streams " + " ".join(argv or sys.argv[1:]),
                    "database": url.rsplit("/", 1)[-1],
                    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "settings": {k: str(v) if isinstance(v, Path) else v
                                 for k, v in vars(args).items()}},
            "machine": machine_info(dbs.server_version()),
            "pinning": {"generator_cpus": sorted(gen_cpus) if gen_cpus else "unpinned",
                        "server_cpus": sorted(server_cpus) if server_cpus else "unpinned"},
            **asyncio.run(measure(args, command, query_port, pids, tokens)),
        }
    finally:
        if procs is not None:
            procs.stop_all()
        if not args.keep:
            dbs.drop_all()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    s = results["streams"]
    ok = s["missing"] == 0 and s["repeated"] == 0 and s["command_errors"] == 0 and (
        results["no_streams"]["command_errors"] == 0) and not s["ended_early"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
