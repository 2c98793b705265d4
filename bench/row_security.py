"""The row-level security pair (`python -m bench --only rls`): the reads of the query
API as its own role, which the read tables' policies bind (`shared.row_security`),
against the same reads without row-level security, in the same run.

- with: `taskctl query-api`, DATABASE_URL naming the query role (`taskservice_query`),
  as production connects it;
- without: the same query API, its statements not setting their user
  (bench/rls_bypassed.py), connected as `bench_query_bypassrls_<random>`: a role made
  for the phase that inherits the query role's privileges and has BYPASSRLS, so no
  policy applies. It is dropped when the phase ends: a login role that bypasses the
  policies must not outlive the measurement on the cluster (roles are cluster-wide).

Both are non-superusers with the same grants, served the same way, on the same data.
Each query kind is measured at saturation on both, back to back, which goes first
alternating by repetition (a drifting machine favours neither); reported: the medians,
the ratio of the medians and the median of each repetition's with/without ratio.
"""

from __future__ import annotations

import secrets
import sys
import time
from typing import Any

import psycopg

from bench.http import Pool, closed_loop
from bench.procs import free_port, taskctl
from bench.stats import CpuMeter, latency_summary, median, ratio
from bench.workload import QUERY_KINDS, OurRequests
from shared import aio
from shared.settings import database_url

QUERY_ROLE = "taskservice_query"  # taskctl.dbinit.QUERY_ROLE (the bench may not import taskctl)
BYPASS_ROLE = "bench_query_bypassrls"  # the prefix: each run makes its own, then drops it
TARGET = 0.9


def make_bypass_role(url: str) -> str:
    """A new login role with BYPASSRLS and the query role's privileges; its name. (The
    fixed-name role runs before 2026-12-04 made and left is dropped too, if it is idle.)"""
    role = f"{BYPASS_ROLE}_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN BYPASSRLS INHERIT")
        conn.execute(f"GRANT {QUERY_ROLE} TO {role}")
        if not conn.execute("SELECT 1 FROM pg_stat_activity WHERE usename = %s",
                            (BYPASS_ROLE,)).fetchone():
            try:
                conn.execute(f"DROP ROLE IF EXISTS {BYPASS_ROLE}")
            except psycopg.Error:
                pass  # it holds privileges elsewhere: left to its owner
    return role


def drop_role(url: str, role: str) -> None:
    """Drop `role` once no session uses it (its server has just stopped; its backends
    may take a moment to go)."""
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + 10
        while conn.execute("SELECT 1 FROM pg_stat_activity WHERE usename = %s",
                           (role,)).fetchone() and time.monotonic() < deadline:
            time.sleep(0.1)
        conn.execute(f"DROP ROLE IF EXISTS {role}")


def measure(bench: Any) -> dict[str, Any]:
    """Start both query APIs beside the run's servers, measure, stop them."""
    bypass = make_bypass_role(bench.url)
    servers: dict[str, Any] = {}
    try:
        for name, argv, role in (
            ("query-api-rls", [*taskctl(), "query-api"], QUERY_ROLE),
            ("query-api-rls-bypassed", [sys.executable, "-m", "bench.rls_bypassed"], bypass),
        ):
            port = free_port()
            servers[name] = bench.servers[name] = bench.procs.start(
                name, [*argv, "--host", "127.0.0.1", "--port", str(port)], port=port,
                env={"DATABASE_URL": database_url(bench.url, user=role)})
        for proc in servers.values():
            bench.procs.wait_healthy(proc)
        return _measure(bench, servers, bypass)
    finally:
        for proc in servers.values():
            bench.procs.stop(proc)
            bench.servers.pop(proc.name, None)
        drop_role(bench.url, bypass)


def _measure(bench: Any, servers: dict[str, Any], bypass: str) -> dict[str, Any]:
    a = bench.args

    def one(port: int, next_request: Any) -> dict[str, Any]:
        bench.settle()
        with CpuMeter(bench.pids()) as cpu:
            r = aio.run(lambda: closed_loop(port, a.connections, a.saturation_seconds,
                                              next_request, warmup=a.warmup))
        ok = [s.latency for s in r.samples if s.ok]
        errs = [s.error for s in r.samples if not s.ok]
        return {"rps": len(ok) / r.window, "errors": len(errs), **latency_summary(ok),
                "error_examples": sorted(set(errs))[:3], "cpu": cpu.result}

    kinds = [k for k in a.kinds if k in QUERY_KINDS]
    with_rls: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    without: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rep in range(a.repeats):
        bench.say(f"row security {rep + 1}/{a.repeats}: {', '.join(kinds)} with and"
                  f" without, {a.saturation_seconds:g}s each")
        for kind in kinds:
            bench.wait_projector(timeout=60)
            ours = OurRequests(bench.users, Pool(0, 0), Pool(0, 0))

            def next_request(rng: Any, kind: str = kind, ours: OurRequests = ours) -> Any:
                built = ours.build(kind, rng)
                return None if built is None else built[1]

            pair = [(with_rls[kind], servers["query-api-rls"].port),
                    (without[kind], servers["query-api-rls-bypassed"].port)]
            for into, port in (pair if rep % 2 == 0 else pair[::-1]):
                into.append(one(port, next_request))

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "rps": round(median([r["rps"] for r in rs]) or 0, 1),
            "rps_runs": [round(r["rps"], 1) for r in rs],
            "p50_ms": median([r["p50_ms"] for r in rs if r["p50_ms"] is not None]),
            "p95_ms": median([r["p95_ms"] for r in rs if r["p95_ms"] is not None]),
            "errors": sum(r["errors"] for r in rs),
            "error_examples": sorted({e for r in rs for e in r["error_examples"]})[:3],
            "cpu": rs[len(rs) // 2]["cpu"],
        }

    out: dict[str, Any] = {
        "with": f"taskctl query-api as {QUERY_ROLE} (the policies apply)",
        "without": f"bench.rls_bypassed (no user set) as {bypass} (BYPASSRLS, the"
                   f" query role's privileges; made for the run and dropped)",
        "bypass_role": bypass,
        "connections": a.connections, "seconds": a.saturation_seconds,
        "repeats": a.repeats, "target": TARGET, "kinds": {},
    }
    for kind in kinds:
        w, wo = summary(with_rls[kind]), summary(without[kind])
        paired = median([x["rps"] / y["rps"]
                         for x, y in zip(with_rls[kind], without[kind], strict=True) if y["rps"]])
        out["kinds"][kind] = {
            "with": w, "without": wo,
            "with_vs_without": ratio(w["rps"], wo["rps"]),
            "with_vs_without_paired": None if paired is None else round(paired, 3),
        }
        bench.say(f"row security {kind}: {w['rps']} vs {wo['rps']} req/s"
                  f" (ratio {out['kinds'][kind]['with_vs_without']},"
                  f" paired {out['kinds'][kind]['with_vs_without_paired']})")
    return out
