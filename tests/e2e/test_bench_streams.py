"""`python -m bench.streams`, smoke-sized: it starts the real processes, opens the
streams, sends the load twice, checks every delivery and cleans up (its database is
dropped). Nothing here asserts on speed: only that every figure is there, every change
reached every stream of its user exactly once, and the streams cost the query API
memory it reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.support import PostgresServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_stream_benchmark_delivers_every_change_to_every_stream(
    pg_server: PostgresServer, tmp_path: Path
):
    out = tmp_path / "streams.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.streams", "--streams", "40", "--users", "20",
         "--rate", "50", "--seconds", "2", "--pg-url", pg_server.url, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    r = json.loads(out.read_text())
    s = r["streams"]
    assert s["streams"] == 40 and s["streams_per_user"] == 2
    assert s["commands"] == 100 and s["command_errors"] == 0
    assert s["deliveries"] == 200 and s["missing"] == s["repeated"] == 0
    assert s["ended_early"] == {}
    assert all(s["delivery"][k] is not None for k in ("p50_ms", "p95_ms", "p99_ms"))
    assert r["no_streams"]["commands"] == 100
    for phase in (r["no_streams"], s):
        assert phase["cpu"]["query-api_core_pct"] is not None
    assert s["query_api_rss_mb_open_idle"] > 0
    database = r["run"]["database"]
    assert database.startswith("taskservice_bench_streams")
    with psycopg.connect(pg_server.url) as conn:  # its database is gone
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (database,)).fetchall()
    assert left == []
