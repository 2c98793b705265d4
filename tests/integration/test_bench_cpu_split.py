"""bench.stats.CpuSplit: the replay benchmark's split of CPU seconds between our
processes and PostgreSQL's, each measured (a child that burns CPU, a query that does)."""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg

from bench.stats import CpuSplit

BURN = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass"
# About a second of one backend's CPU on the 2-core VM (a sum over generated rows).
QUERY = "SELECT sum(g * 2) FROM generate_series(1, 8000000) AS g"


def test_a_child_process_cpu_is_ours_and_not_postgres() -> None:
    with CpuSplit() as cpu:
        subprocess.run([sys.executable, "-c", BURN.format(seconds=0.6)], check=True)
    r = cpu.result
    assert 0.5 <= r["ours_cpu_s"] <= 1.5
    assert r["busy_cpu_s"] >= 0.5  # the machine saw it too
    assert r["cores"] >= 1 and 0 < r["busy_pct"] <= 100


def test_a_query_cpu_is_postgres_and_not_ours(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute("SET max_parallel_workers_per_gather = 0")
        started = time.process_time()
        with CpuSplit() as cpu:
            conn.execute(QUERY).fetchone()
        client = time.process_time() - started
    r = cpu.result
    assert r["postgres_cpu_s"] >= 0.3
    assert r["postgres_cpu_s"] >= 0.5 * r["wall_s"]  # the backend was busy throughout
    assert r["ours_cpu_s"] < 0.2 * r["postgres_cpu_s"]  # no child of this process ran
    assert client < 0.5 * r["postgres_cpu_s"]  # the client mostly waited


def test_with_self_too_this_process_cpu_is_ours() -> None:
    with CpuSplit(self_too=True) as cpu:
        end = time.process_time() + 0.4
        while time.process_time() < end:
            pass
    assert 0.35 <= cpu.result["ours_cpu_s"] <= 1.0
