"""`python -m bench --quick`, the benchmark's smoke run: it starts the real processes,
measures every figure beside its ceiling, writes its results and cleans up.

Nothing here asserts on speed: only that every figure is there and nothing failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.support import PostgresServer

ROOT = Path(__file__).resolve().parents[2]

KINDS = ("list", "get", "history", "create", "update", "complete", "delete")


@pytest.mark.slow
def test_quick_benchmark_reports_every_figure_beside_its_ceiling_without_errors(
    pg_server: PostgresServer, tmp_path: Path
):
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--pg-url", pg_server.url,
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    [path] = tmp_path.glob("*.json")
    assert path.with_suffix(".md").exists()
    r = json.loads(path.read_text())

    assert {"cores", "memory_gb", "postgres", "python"} <= r["machine"].keys()
    assert r["generator_ceiling"]["rps"] > 0

    steady = r["steady"]["kinds"]
    assert set(steady) == set(KINDS)
    for kind, row in steady.items():
        assert row["count"] > 0, kind
        assert None not in (row["p50_ms"], row["p95_ms"], row["p99_ms"]), kind
        assert row["ceiling_p95_ms"] is not None and row["p95_vs_ceiling"] is not None, kind

    assert r["lag"]["count"] > 0 and r["lag"]["p95_ms"] is not None

    saturation = r["saturation"]
    assert set(saturation["ceilings"]) == {"insert", "get_json", "list_json", "history_json"}
    assert set(saturation["kinds"]) == set(KINDS)
    for kind, row in saturation["kinds"].items():
        assert row["rps"] > 0 and row["ratio"] is not None, kind
    checks = saturation["own_writes_check"]
    assert set(checks) == {"list", "get", "history"}
    for kind, row in checks.items():
        assert row["rps"] > 0 and row["errors"] == 0 and row["ours_vs_unchecked"] > 0, kind

    rls = r["row_security"]["kinds"]
    assert set(rls) == {"list", "get", "history"}
    for kind, row in rls.items():
        assert row["with"]["rps"] > 0 and row["without"]["rps"] > 0, kind
        assert row["with"]["errors"] == 0 and row["without"]["errors"] == 0, kind

    replay = r["replay"]
    assert replay["events"] >= 20_000
    assert replay["events_per_s"] > 0 and replay["ceiling_rows_per_s"] > 0
    assert replay["ratio"] is not None
    # Where its time went: the replay's processes and PostgreSQL's, and the ceiling's.
    for cpu in (replay["cpu"], replay["ceiling_cpu"]):
        assert cpu["postgres_cpu_s"] > 0 and cpu["busy_cpu_s"] > 0
    assert replay["cpu"]["ours_cpu_s"] > 0  # taskctl replay ran in a process of its own

    assert {t["figure"] for t in r["targets"]} >= {"errors", "replay (events/s)"}
    assert r["errors_total"] == 0, json.dumps(r, indent=1)[-4000:]

    # its databases are dropped, and the login role it made to bypass row-level security
    with psycopg.connect(pg_server.url) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s",
            (r["data"]["database"] + "%",),
        ).fetchall()
        bypass = r["row_security"]["bypass_role"]
        assert bypass.startswith("bench_query_bypassrls_")
        role = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (bypass,)).fetchone()
    assert left == []
    assert role is None


def run_small(module: str, pg_url: str) -> subprocess.CompletedProcess[str]:
    """`python -m <module> -n 20 --rounds 1` against `pg_url`; it must succeed."""
    run = subprocess.run(
        [sys.executable, "-m", module, "-n", "20", "--rounds", "1", "--pg-url", pg_url],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_cpu_per_command_runs_every_kind_beside_the_ceiling_and_cleans_up(
    pg_server: PostgresServer,
):
    run = run_small("bench.cpu", pg_server.url)
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()[2:]}
    assert set(rows) == {"insert", "create", "update", "complete"}, run.stdout
    assert all(float(row[-3]) > 0 for row in rows.values()), run.stdout  # us per request
    with psycopg.connect(pg_server.url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'taskservice_benchcpu%'"
        ).fetchone()
    assert left == (0,)


def test_projector_cpu_compares_both_loops_and_cleans_up(pg_server: PostgresServer):
    run = run_small("bench.projector_cpu", pg_server.url)
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()[1:]}
    assert set(rows) == {"asyncio", "uvloop"}, run.stdout
    assert all(float(row[1]) > 0 for row in rows.values()), run.stdout  # us per step
    with psycopg.connect(pg_server.url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'taskservice_projcpu%'"
        ).fetchone()
    assert left == (0,)
