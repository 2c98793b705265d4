"""Time a full rebuild of the read tables from the event log, in its own process.

Two ways, chosen by `--replay-via`:

- `projector`: `python -m bench.replay_worker DSN`, which creates the read tables and
  runs the live projector's code path (the runner with its live sink) over the whole
  log; the time is measured inside the worker.
- `taskctl`: `taskctl replay` (REPLAY_COMMAND), timed from outside. **The hook:** when
  the replay CLI lands, check REPLAY_COMMAND matches its interface; `auto` (the
  default) already picks it as soon as `taskctl` has a `replay` subcommand.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT, master_key, taskctl

# Rebuild every read table of $DATABASE_URL from the whole event log, then exit.
REPLAY_COMMAND = ["replay", "--json"]


def taskctl_has_replay() -> bool:
    """Whether `taskctl replay --help` runs (the CLI package is run, never imported)."""
    done = subprocess.run([*taskctl(), "replay", "--help"], cwd=ROOT, capture_output=True,
                          timeout=60, check=False)
    return done.returncode == 0


def _pinned(cpus: set[int] | None, argv: list[str]) -> list[str]:
    if not cpus:
        return argv
    return [sys.executable, "-m", "bench.pin", ",".join(map(str, sorted(cpus))), "--", *argv]


def rebuild(url: str, cpus: set[int] | None, via: str, log_dir: Path,
            timeout: float) -> dict[str, Any]:
    if via == "auto":
        via = "taskctl" if taskctl_has_replay() else "projector"
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT),
           # taskctl's settings insist on an auth method even for offline commands
           "BETTER_AUTH_SECRET": secrets.token_urlsafe(48), "ENVIRONMENT": "production",
           "DATA_MASTER_KEY": master_key()}
    log = log_dir / "replay.log"
    if via == "projector":
        argv = _pinned(cpus, [sys.executable, "-m", "bench.replay_worker", url])
        out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        log.write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"replay worker failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["via"] = "the live projector's runner into fresh read tables (bench.replay_worker)"
        return result

    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM tasks_events").fetchone()
    events = int(row[0]) if row else 0
    argv = _pinned(cpus, [*taskctl(), *REPLAY_COMMAND])
    started = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                       timeout=timeout, check=True)
    seconds = time.perf_counter() - started
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds,
            "via": f"taskctl {' '.join(REPLAY_COMMAND)} (wall time, includes start-up)"}
