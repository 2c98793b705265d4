"""The benchmark run: set up, measure each figure beside its ceiling, tear down.

    python -m bench [--quick] [options]      (also: taskctl bench ...)

Phases, in order: data (seed through the event store, live projector catches up),
generator ceiling, steady load (ours, then the ceiling app under the same schedule),
saturation (every kind and every ceiling endpoint, interleaved, repeated), the reads
with row-level security against the same reads without (bench/row_security.py), replay
(scratch database, each rebuild in turn with a bare COPY of the rows it wrote). Every process the
run starts is stopped by PID in a `finally`, also on Ctrl-C; databases are dropped
unless `--keep`.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import signal
import socket
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import data, report
from bench.http import Pool, closed_loop, open_loop
from bench.procs import ROOT, Proc, Processes, db_init, free_port, master_key, split_cpus, taskctl
from bench.replay import against_ceiling, rebuild
from bench.sealed_copy import sealed_twin
from bench.stats import CpuMeter, by_kind, latency_summary, median, ratio
from bench.workload import (
    CEILING_OF,
    CEILINGS,
    COMMAND_KINDS,
    KINDS,
    QUERY_KINDS,
    CeilingRequests,
    LagProbes,
    OurRequests,
    Users,
    mixer,
    parse_mix,
)
from shared import aio
from shared.settings import Settings

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = ROOT / "bench" / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the real processes against bare FastAPI+asyncpg ceilings.",
    )
    p.add_argument("--quick", action="store_true",
                   help="small data, short phases, 20,000-event replay (< 1 minute; CI smoke)")
    p.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL),
                   help="a PostgreSQL server where the run may create and drop databases")
    p.add_argument("--users", type=int)
    p.add_argument("--tasks-per-user", type=int)
    p.add_argument("--rate", type=float, default=200, help="steady arrival rate, requests/s")
    p.add_argument("--steady-seconds", type=float)
    p.add_argument("--ceiling-steady-seconds", type=float)
    p.add_argument("--mix", help="kind=weight,... (default " + ",".join(
        f"{k}={w}" for k, w in parse_mix(None).items()) + ")")
    p.add_argument("--connections", type=int, default=100, help="saturation connections per kind")
    p.add_argument("--saturation-seconds", type=float)
    p.add_argument("--warmup", type=float)
    p.add_argument("--repeats", type=int, help="saturation and ceiling repetitions (median)")
    p.add_argument("--replay-events", type=int)
    p.add_argument("--replay-rounds", type=int,
                   help="rounds of the replay phase: each rebuilds the sealed store (then its"
                        " ceiling) and the open one, alternating which goes first (default 2;"
                        " 1 with --quick)")
    p.add_argument("--replay-via", choices=("auto", "projector", "taskctl"), default="auto",
                   help="time `taskctl replay` when it exists (auto), or the projector's"
                        " catch_up into fresh read tables")
    p.add_argument("--cpus", help='"GEN/SERVERS" e.g. "0/1", or "none" (default: first'
                                  " quarter of the cores for the generator, the rest for servers)")
    p.add_argument("--only", help="comma list of phases: steady,saturation,rls,replay"
                                  " (default all)")
    p.add_argument("--scale", action="store_true",
                   help="the cost-growth curve instead (bench/scale.py): one store per size")
    p.add_argument("--scale-sizes", help="with --scale: comma list of task counts"
                                         " (default 10000,100000,1000000)")
    p.add_argument("--kinds", help="comma list of request kinds the saturation phase measures,"
                                   " each with its ceiling (default all: " + ",".join(KINDS) + ")")
    p.add_argument("--log-level", default="warning", help="of every server (same for all)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--keep", action="store_true", help="keep the benchmark databases")
    return p


def configure(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    defaults = {
        "users": (10, 100), "tasks_per_user": (200, 1000),
        "steady_seconds": (4, 60), "ceiling_steady_seconds": (2, 30),
        "saturation_seconds": (1.0, 4), "warmup": (0.5, 1.0), "repeats": (1, 3),
        "replay_events": (20_000, 1_000_000),
    }
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.phases = set((args.only or "steady,saturation,rls,replay").split(","))
    args.kinds = [k for k in KINDS if k in (args.kinds or ",".join(KINDS)).split(",")]
    return args


def machine_info(pg_version: str) -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "postgres": pg_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.secret = secrets.token_urlsafe(48)
        self.gen_cpus, self.server_cpus = split_cpus(args.cpus)
        self.log_dir = Path(tempfile.mkdtemp(prefix="taskservice-bench-"))
        self.dbs = data.Databases(args.pg_url)
        self.procs: Processes | None = None
        self.url = ""
        self.results: dict[str, Any] = {}
        self.servers: dict[str, Proc] = {}

    # -- set-up ----------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def setup(self) -> None:
        a = self.args
        if self.gen_cpus:
            os.sched_setaffinity(0, self.gen_cpus)
        pg_version = self.dbs.server_version()
        self.results["run"] = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "quick": a.quick,
            "command": "python -m bench " + " ".join(sys.argv[1:]),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                         if k not in ("phases",)},
        }
        self.results["machine"] = machine_info(pg_version)
        self.results["pinning"] = {
            "generator_cpus": sorted(self.gen_cpus) if self.gen_cpus else "unpinned",
            "server_cpus": sorted(self.server_cpus) if self.server_cpus else "unpinned",
            "postgres": "unpinned (not started by the harness)",
            "servers": "command-api, query-api, projector, ceiling app",
            # The replay runs alone (servers stopped, no generator) and by design uses a
            # second process (its verification fold): it gets every core.
            "replay": "unpinned",
        }
        self.say(f"generator on CPUs {self.results['pinning']['generator_cpus']}, servers on"
                 f" {self.results['pinning']['server_cpus']}; logs in {self.log_dir}")

        self.url = self.dbs.create()
        self.settings = Settings(environment="production", database_url=self.url,
                                 better_auth_secret=self.secret)
        db_init(self.url)
        user_ids = [uuid.uuid4().hex for _ in range(a.users)]
        self.say(f"seeding {a.users} users x {a.tasks_per_user} tasks through the event store")
        ids, seconds = data.seed_tasks(self.settings, user_ids, a.tasks_per_user)
        events = a.users * a.tasks_per_user
        data.fill_ceiling(self.url, ids)
        self.users = Users(self.secret, ids)
        self.results["data"] = {
            "database": self.url.rsplit("/", 1)[-1],
            "users": a.users, "tasks_per_user": a.tasks_per_user, "events": events,
            "seed_seconds": round(seconds, 2), "seed_events_per_s": round(events / seconds),
        }

        env = {"DATABASE_URL": self.url, "BETTER_AUTH_SECRET": self.secret,
               "ENVIRONMENT": "production", "LOG_LEVEL": a.log_level.upper(),
               "BENCH_CEILING_DSN": self.url, "DATA_MASTER_KEY": master_key()}
        self.procs = Processes(self.log_dir, self.server_cpus, env)
        tc = taskctl()
        started = time.perf_counter()
        projector = self.procs.start("projector", [*tc, "projector"])
        self.servers["projector"] = projector
        for name, argv in (
            ("command-api", [*tc, "command-api", "--host", "127.0.0.1"]),
            ("query-api", [*tc, "query-api", "--host", "127.0.0.1"]),
            ("ceiling", [sys.executable, "-m", "bench.ceiling_app"]),
        ):
            port = free_port()
            self.servers[name] = self.procs.start(name, [*argv, "--port", str(port)], port=port)
        # The "before": the same command API with the library's table-locking
        # writer (bench/locked_store.py), measured at saturation in the same run.
        port = free_port()
        self.servers["command-api-locked"] = self.procs.start(
            "command-api-locked",
            [sys.executable, "-m", "bench.locked_store", "--host", "127.0.0.1", "--port", str(port)],
            port=port,
        )
        # The "without": the same query API without the read-your-own-writes check
        # (bench/unchecked_reads.py), measured at saturation in the same run.
        port = free_port()
        self.servers["query-api-unchecked"] = self.procs.start(
            "query-api-unchecked",
            [sys.executable, "-m", "bench.unchecked_reads", "--host", "127.0.0.1",
             "--port", str(port)],
            port=port,
        )
        # The "without" of sealing: the same command API storing the fields open
        # (bench/unsealed_store.py), measured at saturation in the same run.
        port = free_port()
        self.servers["command-api-unsealed"] = self.procs.start(
            "command-api-unsealed",
            [sys.executable, "-m", "bench.unsealed_store", "--host", "127.0.0.1",
             "--port", str(port)],
            port=port,
        )
        for name in ("command-api", "query-api", "ceiling", "command-api-locked",
                     "query-api-unchecked", "command-api-unsealed"):
            self.procs.wait_healthy(self.servers[name])
        self.say("servers up; waiting for the projector to catch up")
        caught_up = self.wait_projector(timeout=60 + events / 1000)
        seconds = time.perf_counter() - started
        data.analyze(self.url)  # ours analyzed like the ceiling's tables
        self.results["data"].update({
            "projector_catch_up_seconds": round(seconds, 2),
            "projector_catch_up_events_per_s": round(events / seconds),
            "projector_caught_up": caught_up,
        })

    def wait_projector(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        target = data.event_count(self.url)
        projector = self.servers["projector"]
        while time.monotonic() < deadline:
            if not projector.alive():
                raise RuntimeError(f"the projector exited:\n{projector.tail()}")
            if data.checkpoint(self.url) >= target:
                return True
            time.sleep(0.05)
        return False

    def settle(self, timeout: float = 60) -> None:
        """Wait (bounded) until no server burns more than 10% of a core over half a second:
        an overloaded phase leaves a backlog the servers keep working through after the
        client gave up, which would otherwise be charged to the next phase."""
        deadline = time.monotonic() + timeout
        servers = {n: p for n, p in self.pids().items() if n != "generator"}
        while time.monotonic() < deadline:
            with CpuMeter(servers) as cpu:
                time.sleep(0.5)
            if all((v or 0) < 10 for k, v in cpu.result.items() if k != "machine_busy_pct"):
                return

    def pids(self) -> dict[str, int]:
        out = {"generator": os.getpid()}
        out.update({n: p.pid for n, p in self.servers.items() if p.pid is not None})
        return out

    # -- phases ------------------------------------------------------------------------

    def generator_ceiling(self) -> None:
        a = self.args
        port = self.servers["ceiling"].port
        assert port is not None
        from bench.http import Request

        runs = []
        for _ in range(a.repeats):
            with CpuMeter(self.pids()) as cpu:
                r = aio.run(lambda: closed_loop(
                    port, a.connections, a.saturation_seconds,
                    lambda _rng: Request("const", "GET", "/const"), warmup=a.warmup))
            ok = [s.latency for s in r.samples if s.ok]
            runs.append({"rps": len(ok) / r.window, "errors": len(r.samples) - len(ok),
                         **latency_summary(ok), "cpu": cpu.result})
        self.results["generator_ceiling"] = {
            "target": "GET /const answered in raw ASGI by uvicorn (ceiling app)",
            "connections": a.connections,
            "rps": round(median([r["rps"] for r in runs]) or 0),
            "rps_runs": [round(r["rps"]) for r in runs],
            "errors": sum(r["errors"] for r in runs),
            "p50_ms": median([r["p50_ms"] for r in runs if r["p50_ms"] is not None]),
            "cpu": runs[-1]["cpu"],
        }
        self.say(f"generator ceiling: {self.results['generator_ceiling']['rps']} req/s")

    def steady(self) -> None:
        a = self.args
        mix = parse_mix(a.mix)
        cmd_port = self.servers["command-api"].port
        query_port = self.servers["query-api"].port
        ceiling_port = self.servers["ceiling"].port
        assert cmd_port and query_port and ceiling_port

        async def ours(duration: float, seed: int, with_probes: bool) -> Any:
            command, query = Pool(cmd_port, 512), Pool(query_port, 512)
            probes = LagProbes(Pool(query_port, 256)) if with_probes else None
            build = OurRequests(self.users, command, query, probes).build
            result = await open_loop(a.rate, duration, mixer(mix, build), seed=seed)
            if probes is not None:
                await probes.drain(20)
            for pool in (command, query) + ((probes.pool,) if probes else ()):
                pool.close()
            return result, probes

        async def ceiling(duration: float, seed: int) -> Any:
            pool = Pool(ceiling_port, 512)
            result = await open_loop(a.rate, duration, mixer(mix, CeilingRequests(
                self.users, pool).build), seed=seed)
            pool.close()
            return result

        self.say(f"steady: warm-up, then {a.rate:g} req/s for {a.steady_seconds:g}s (ours)")
        aio.run(lambda: ours(a.warmup, 99, False))
        with CpuMeter(self.pids()) as cpu:
            result, probes = aio.run(lambda: ours(a.steady_seconds, 1, True))
        self.settle()
        self.say(f"steady: {a.rate:g} req/s for {a.ceiling_steady_seconds:g}s (ceiling app)")
        aio.run(lambda: ceiling(a.warmup, 98))
        with CpuMeter(self.pids()) as ceiling_cpu:
            ceiling_result = aio.run(lambda: ceiling(a.ceiling_steady_seconds, 1))

        kinds = by_kind(result.samples)
        ceiling_kinds = by_kind(ceiling_result.samples)
        for kind, row in kinds.items():
            c = ceiling_kinds.get(kind, {})
            row["ceiling"] = CEILING_OF[kind]
            row["ceiling_p50_ms"] = c.get("p50_ms")
            row["ceiling_p95_ms"] = c.get("p95_ms")
            row["ceiling_p99_ms"] = c.get("p99_ms")
            row["ceiling_errors"] = c.get("errors", 0)
            row["p95_vs_ceiling"] = ratio(row["p95_ms"], c.get("p95_ms"))
        lag = latency_summary(probes.lags)
        self.results["steady"] = {
            "rate": a.rate, "seconds": a.steady_seconds,
            "ceiling_seconds": a.ceiling_steady_seconds,
            "mix": mix, "requests": len(result.samples),
            "achieved_rate": round(len(result.samples) / result.elapsed, 1),
            "send_lag": latency_summary(result.send_lag),
            "ceiling_send_lag": latency_summary(ceiling_result.send_lag),
            "kinds": {k: kinds[k] for k in KINDS if k in kinds},
            "cpu": cpu.result, "ceiling_cpu": ceiling_cpu.result,
        }
        self.results["lag"] = {
            "method": "GET /api/tasks/{id} with X-Min-Position after each create's response,"
                      " re-asked until non-stale",
            "count": len(probes.lags), "errors": len(probes.errors),
            "error_examples": sorted(set(probes.errors))[:3],
            **lag,
            "floor_ms": kinds.get("get", {}).get("p50_ms"),
            "floor": "steady p50 of a single-task read (a probe is at least one read)",
        }

    def saturation(self) -> None:
        a = self.args
        ports = {"command-api": self.servers["command-api"].port,
                 "query-api": self.servers["query-api"].port,
                 "ceiling": self.servers["ceiling"].port}
        measured = a.kinds
        ceiling_names = [c for c in CEILINGS if c in {CEILING_OF[k] for k in measured}]
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in (*measured, *ceiling_names)}
        locked: dict[str, list[dict[str, Any]]] = {}
        unchecked: dict[str, list[dict[str, Any]]] = {}
        unsealed: dict[str, list[dict[str, Any]]] = {}
        ceiling_requests = CeilingRequests(self.users, Pool(0, 0))

        def one(name: str, port: int, next_request: Any) -> dict[str, Any]:
            self.settle()
            with CpuMeter(self.pids()) as cpu:
                r = aio.run(lambda: closed_loop(port, a.connections, a.saturation_seconds,
                                                  next_request, warmup=a.warmup))
            ok = [s.latency for s in r.samples if s.ok]
            errs = [s.error for s in r.samples if not s.ok]
            return {"rps": len(ok) / r.window, "errors": len(errs), **latency_summary(ok),
                    "error_examples": sorted(set(errs))[:3], "exhausted": r.exhausted,
                    "cpu": cpu.result}

        for rep in range(a.repeats):
            self.say(f"saturation {rep + 1}/{a.repeats}: {a.connections} connections,"
                     f" {a.saturation_seconds:g}s per kind")
            for name in ceiling_names:
                if name == "insert":  # a read's ceiling runs beside it, below
                    runs[name].append(one(name, ports["ceiling"],
                                          lambda rng, n=name: ceiling_requests.endpoint(n, rng)))
            for kind in measured:
                if kind in QUERY_KINDS:
                    self.wait_projector(timeout=60)
                ours = OurRequests(self.users, Pool(0, 0), Pool(0, 0))

                def next_request(rng: Any, kind: str = kind, ours: OurRequests = ours) -> Any:
                    built = ours.build(kind, rng)
                    return None if built is None else built[1]

                port = ports["query-api" if kind in QUERY_KINDS else "command-api"]
                if kind in COMMAND_KINDS:
                    # Ours and the same commands unsealed, back to back, which goes
                    # first alternating by repetition.
                    pair = [(runs[kind], port),
                            (unsealed.setdefault(kind, []),
                             self.servers["command-api-unsealed"].port)]
                    for into, at in (pair if rep % 2 == 0 else pair[::-1]):
                        into.append(one(kind, at, next_request))
                    locked.setdefault(kind, []).append(
                        one(kind, self.servers["command-api-locked"].port, next_request))
                    continue
                # Ours, its ceiling and the same reads without the own-writes check, in
                # turn, which goes first alternating by repetition (a drifting machine
                # favours no one).
                name = CEILING_OF[kind]
                trio = [(runs[kind], port, next_request),
                        (runs[name], ports["ceiling"],
                         lambda rng, n=name: ceiling_requests.endpoint(n, rng)),
                        (unchecked.setdefault(kind, []),
                         self.servers["query-api-unchecked"].port, next_request)]
                for into, at, requests in (trio if rep % 2 == 0 else trio[::-1]):
                    into.append(one(kind, at, requests))

        def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "rps": round(median([r["rps"] for r in rs]) or 0, 1),
                "rps_runs": [round(r["rps"], 1) for r in rs],
                "p50_ms": median([r["p50_ms"] for r in rs if r["p50_ms"] is not None]),
                "p95_ms": median([r["p95_ms"] for r in rs if r["p95_ms"] is not None]),
                "p99_ms": median([r["p99_ms"] for r in rs if r["p99_ms"] is not None]),
                "errors": sum(r["errors"] for r in rs),
                "error_examples": sorted({e for r in rs for e in r["error_examples"]})[:3],
                "exhausted": any(r["exhausted"] for r in rs),
                "cpu": rs[len(rs) // 2]["cpu"],
            }

        ceilings = {name: summary(runs[name]) for name in ceiling_names}
        kinds = {}
        for kind in measured:
            row = summary(runs[kind])
            row["ceiling"] = CEILING_OF[kind]
            row["ceiling_rps"] = ceilings[CEILING_OF[kind]]["rps"]
            row["ratio"] = ratio(row["rps"], row["ceiling_rps"])
            if kind in QUERY_KINDS:  # each repetition ran it beside its ceiling
                row["ratio_paired"] = median([
                    o["rps"] / c["rps"]
                    for o, c in zip(runs[kind], runs[CEILING_OF[kind]], strict=True) if c["rps"]])
            kinds[kind] = row
        table_lock = {}
        for kind, rs in locked.items():
            row = summary(rs)
            row["ratio"] = ratio(row["rps"], ceilings["insert"]["rps"])
            row["ours_vs_table_lock"] = ratio(kinds[kind]["rps"], row["rps"])
            table_lock[kind] = row
        def against(without: dict[str, list[dict[str, Any]]], name: str) -> dict[str, Any]:
            """Each kind's "without" runs, and ours over them: the ratio of medians and
            (each repetition's pair ran back to back) the median of the pairs' ratios."""
            out = {}
            for kind, rs in without.items():
                row = summary(rs)
                row[f"ours_vs_{name}"] = ratio(kinds[kind]["rps"], row["rps"])
                row[f"ours_vs_{name}_paired"] = median(
                    [a["rps"] / b["rps"] for a, b in zip(runs[kind], rs, strict=True) if b["rps"]])
                out[kind] = row
            return out

        without_check = against(unchecked, "unchecked")
        without_sealing = against(unsealed, "unsealed")
        self.results["saturation"] = {
            "connections": a.connections, "seconds": a.saturation_seconds,
            "warmup": a.warmup, "repeats": a.repeats, "kinds": kinds, "ceilings": ceilings,
            "table_lock_baseline": table_lock,
            "own_writes_check": without_check,
            "sealing": without_sealing,
        }

    def stop_servers(self) -> None:
        if self.procs is not None:
            self.procs.stop_all()

    def replay(self) -> None:
        a = self.args
        url = self.dbs.create("replay")
        try:
            settings = Settings(environment="production", database_url=url,
                                better_auth_secret=self.secret)
            db_init(url)
            self.say(f"replay: writing {a.replay_events:,} events to a scratch database")
            events, seed_seconds = data.seed_replay_events(settings, a.replay_events)
            self.say(f"replay: {events:,} events written in {seed_seconds:.1f}s; sealing a twin")
            twin = self.dbs.create("replay_sealed")
            db_init(twin)
            _, twin_seconds = sealed_twin(url, twin, master_key())
            # The same events sealed (as the command API writes them) and open (as before
            # sealing), rebuilt in turn, sealed first then open, then open first.
            sealed_runs: list[dict[str, Any]] = []
            open_runs: list[dict[str, Any]] = []
            # Each sealed rebuild in turn with its ceiling: a bare COPY of the rows it wrote.
            ceilings: list[dict[str, Any]] = []
            rounds = a.replay_rounds or (1 if a.quick else 2)
            for n in range(rounds):
                order = [(twin, sealed_runs), (url, open_runs)]
                for at, into in (order if n % 2 == 0 else order[::-1]):
                    self.say(f"replay: rebuilding the {'sealed' if at == twin else 'open'}"
                             f" store ({n + 1}/{rounds})")
                    into.append(rebuild(at, None, a.replay_via, self.log_dir,
                                        timeout=max(120, events / 1000)))
                    if at == twin:
                        self.say("replay: its ceiling (COPY of the rows it wrote)")
                        ceilings.append(data.copy_ceiling(twin, 1))
            if not a.keep:
                self.dbs.drop(twin)
            unsealed = median([r["events_per_s"] for r in open_runs])
            self.results["replay"] = {
                **against_ceiling(sealed_runs, ceilings),
                "seed_seconds": round(seed_seconds, 1),
                "sealing": {
                    "sealed_events_per_s": [round(r["events_per_s"]) for r in sealed_runs],
                    "open_events_per_s": [round(r["events_per_s"]) for r in open_runs],
                    "twin_seconds": round(twin_seconds, 1),
                    "ratio": ratio(median([r["events_per_s"] for r in sealed_runs]), unsealed),
                    "paired": median([s["events_per_s"] / o["events_per_s"]
                                      for s, o in zip(sealed_runs, open_runs, strict=True)]),
                },
            }
        finally:
            if not a.keep:
                self.dbs.drop(url)

    # -- tear-down -----------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self.stop_servers()
        finally:
            if not self.args.keep:
                self.dbs.drop_all()
            elif self.dbs.created:
                self.say(f"kept databases: {', '.join(self.dbs.created)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scale:
        from bench.scale import main as scale

        return scale(args)
    args = configure(args)

    def terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    bench = Bench(args)
    started = time.perf_counter()
    try:
        bench.setup()
        if "steady" in args.phases or "saturation" in args.phases:
            bench.generator_ceiling()
        if "steady" in args.phases:
            bench.steady()
        if "saturation" in args.phases:
            bench.saturation()
        if "rls" in args.phases:  # reads with row-level security vs without (bench/row_security.py)
            from bench import row_security

            # The saturation's with/without variants are done: their pools' connections
            # go back to the server before the phase starts two query APIs of its own.
            for name in ("command-api-locked", "command-api-unsealed", "query-api-unchecked"):
                if name in bench.servers:
                    bench.procs.stop(bench.servers.pop(name))

            bench.results["row_security"] = row_security.measure(bench)
        bench.stop_servers()
        if "replay" in args.phases:
            bench.replay()
    except KeyboardInterrupt:
        bench.say("interrupted; stopping every process and dropping the databases")
        return 130
    finally:
        bench.teardown()
    bench.results["run"]["seconds"] = round(time.perf_counter() - started, 1)
    bench.results["run"]["server_logs"] = str(bench.log_dir)
    report.finish(bench.results, args.results_dir)
    return 0 if report.error_total(bench.results) == 0 else 1
