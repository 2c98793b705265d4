"""`python -m bench --scale` end to end at a tiny size: the real processes, every
promised figure in the result for every size, nothing failed, its databases dropped.

Nothing here asserts on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from bench import scale, scale_report
from tests.support import PostgresServer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_scale_mode_measures_every_figure_at_every_size_and_cleans_up(
    pg_server: PostgresServer, tmp_path: Path
):
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--scale", "--scale-sizes", "200,400",
         "--tasks-per-user", "20", "--steady-seconds", "2", "--warmup", "0.5",
         "--repeats", "1", "--rate", "50", "--pg-url", pg_server.url,
         "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    [path] = tmp_path.glob("*-scale.json")
    assert path.with_suffix(".md").exists()
    r = json.loads(path.read_text())

    assert "failed" not in r["run"]
    assert [s["tasks"] for s in r["steps"]] == [200, 400]
    for step in r["steps"]:
        assert step["users"] * 20 == step["tasks"]
        assert step["events"] == step["tasks"] * scale.EVENTS_PER_TASK
        assert step["read_task_rows"] == step["tasks"] * 3 // 4  # a quarter deleted
        missing = [key for key, _ in scale_report.COLUMNS if step.get(key) is None]
        assert missing == [], missing
        assert step["errors"] == 0 and "failed_rounds" not in step
        assert "failed_finish" not in step
        assert step["idempotency_keys"] == scale.KEYED_CREATES
        assert step["catch_up_events"] >= scale.CATCH_UP_EVENTS
    assert set(r["slopes"]) == set(scale_report.SLOPE_METRICS)
    names = [step["database"] for step in r["steps"]]
    assert all(name.startswith(f"bench_scale_{s['tasks']}_")
               for name, s in zip(names, r["steps"], strict=True))
    with psycopg.connect(pg_server.url) as conn:
        left = conn.execute("SELECT datname FROM pg_database WHERE datname = ANY(%s)",
                            (names,)).fetchall()
    assert left == []
