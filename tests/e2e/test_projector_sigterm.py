"""`taskctl projector` on SIGTERM, with a backlog: it finishes the batch in hand (its
transaction commits whole), does not go on with the backlog, and exits 0."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from shared.catalog import EVENTS_TABLE
from shared.position import ZERO
from tests.support.process import Proc, free_port
from tests.support.projection import Writer, checkpoint, max_position, wait_until

pytestmark = pytest.mark.slow


def counts(url: str) -> tuple[int, int]:
    """(events up to the checkpoint, history rows): equal when every batch was whole."""
    cp = checkpoint(url) or ZERO
    with psycopg.connect(url) as conn:
        events = conn.execute(
            f"SELECT count(*) FROM {EVENTS_TABLE}"
            " WHERE (tx_id, notification_id) <= (%s::text::xid8, %s)",
            (str(cp.tx_id), cp.notification_id),
        ).fetchone()[0]
        history = conn.execute("SELECT count(*) FROM read_task_history").fetchone()[0]
    return events, history


def test_sigterm_ends_the_current_batch_cleanly_and_exits_0(own_db: str, tmp_path: Path):
    writer = Writer(own_db)
    try:
        for _ in range(4):
            writer.bulk(users=10, tasks_per_user=100)
    finally:
        writer.close()
    end = max_position(own_db)
    metrics_port = free_port()
    env = {**os.environ, "DATABASE_URL": own_db, "ENVIRONMENT": "test", "LOG_LEVEL": "INFO",
           "METRICS_PORT": str(metrics_port)}
    projector = Proc([sys.executable, "-m", "taskctl.cli", "projector", "--batch-size", "20",
                      "--poll-interval", "0.2"], tmp_path / "projector.log", env)
    try:
        health = projector.wait_http(f"http://127.0.0.1:{metrics_port}/health")
        assert health.json()["data"]["service"] == "projector"
        wait_until(lambda: (checkpoint(own_db) or ZERO) > ZERO)
        time.sleep(0.3)  # well inside the backlog, most likely mid-batch
        projector.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        status = projector.proc.wait(timeout=15)
        took = time.monotonic() - started
    finally:
        projector.stop(signal.SIGKILL)
    log = projector.output()
    assert status == 0, log
    assert took < 5, f"SIGTERM took {took:.1f}s"
    stopped_at = checkpoint(own_db)
    assert stopped_at is not None and ZERO < stopped_at < end, (stopped_at, end)  # backlog left
    events, history = counts(own_db)
    assert events == history  # the last batch committed whole, or not at all
    assert "projector stopped" in log and "Traceback" not in log, log
    with pytest.raises(httpx.TransportError):  # the metrics server went with it
        httpx.get(f"http://127.0.0.1:{metrics_port}/health", timeout=1)
