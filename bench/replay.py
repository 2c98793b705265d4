"""Time a full rebuild of the read tables from the event log, in its own process.

Two ways, chosen by `--replay-via`:

- `projector`: `python -m bench.replay_worker DSN`, which creates the read tables and
  runs the live projector's code path (the runner with its live sink) over the whole
  log; the time is measured inside the worker.
- `taskctl`: `taskctl replay` (REPLAY_COMMAND), timed from outside (wall time, start-up
  included); its `--json` line adds the phases and the peak RSS of the replay process
  and of its fold process (VmHWM). `auto` (the default) picks it when `taskctl`
  has a `replay` subcommand.

Either way the result has `cpu` (`bench.stats.CpuSplit`): the CPU seconds the replay's
processes took, PostgreSQL's, and the machine's busy share, so a figure shows whether
the time went to our code or to the server, and whether the cores were idle.

The harness times each replay in turn with its ceiling (`bench.data.copy_ceiling`: a bare
COPY of the rows the replay wrote into tables of the same keys and indexes);
`against_ceiling` reports the medians and the median of the turns' ratios (ceiling seconds
over replay seconds).
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

from bench.procs import ROOT, master_key, pinned, taskctl, unpinned
from bench.stats import CpuSplit, median

# Rebuild every read table of $DATABASE_URL from the whole event log, then exit.
REPLAY_COMMAND = ["replay", "--json"]


def taskctl_has_replay() -> bool:
    """Whether `taskctl replay --help` runs (the CLI package is run, never imported)."""
    done = subprocess.run([*taskctl(), "replay", "--help"], cwd=ROOT, capture_output=True,
                          timeout=60, check=False)
    return done.returncode == 0


def _pinned(cpus: set[int] | None, argv: list[str]) -> list[str]:
    return pinned(cpus, argv) if cpus else unpinned(argv)  # not the harness's own CPUs


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
        with CpuSplit() as cpu:
            out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=timeout, check=False)
        log.write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"replay worker failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["via"] = "the live projector's runner into fresh read tables (bench.replay_worker)"
        result["cpu"] = cpu.result
        return result

    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM tasks_events").fetchone()
    events = int(row[0]) if row else 0
    argv = _pinned(cpus, [*taskctl(), *REPLAY_COMMAND])
    with open(log, "w") as f, CpuSplit() as cpu:
        started = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                       timeout=timeout, check=True)
        seconds = time.perf_counter() - started
    summary = json.loads([line for line in log.read_text().splitlines()
                          if line.startswith("{")][-1])
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds,
            "phases": summary.get("phases"), "peak_rss_mb": summary.get("peak_rss_mb"),
            "cpu": cpu.result,
            "via": f"taskctl {' '.join(REPLAY_COMMAND)} (wall time, includes start-up)"}


CEILING = (
    "the rows the replay wrote (read tables: tasks, history, stats) dumped with binary COPY"
    " TO STDOUT (not timed), then COPY FROM STDIN (FORMAT binary), one connection,"
    " synchronous_commit off, into fresh tables made as the replay makes them, then the same"
    " keys and indexes built the same way (projections.replay.build_keys_and_indexes);"
    " timed: the COPYs and the builds. Ratio: ceiling seconds / replay seconds, the median"
    " of the turns (each rebuild, then its ceiling)"
)


def against_ceiling(replays: list[dict[str, Any]],
                    ceilings: list[dict[str, Any]]) -> dict[str, Any]:
    """The replay figure: the median run of `replays` (its phases, CPU and peak RSS, the
    largest peak of all), beside `ceilings` (`bench.data.copy_ceiling` runs, each taken
    in turn with the replay of the same index): medians, the median ceiling's CPU, and
    the median of the turns' ratios (ceiling seconds / replay seconds)."""
    events = replays[-1]["events"]
    middle = sorted(replays, key=lambda r: r["seconds"])[len(replays) // 2]
    ceiling = median([c["seconds"] for c in ceilings]) or 0.0
    middle_ceiling = sorted(ceilings, key=lambda c: c["seconds"])[len(ceilings) // 2]
    rows = sum(ceilings[-1]["rows"].values())
    peaks = [r["peak_rss_mb"] for r in replays if r.get("peak_rss_mb")]
    return {
        **middle,
        "seconds": round(middle["seconds"], 2),
        "events_per_s": round(middle["events_per_s"]),
        # Each process's largest (a small store's replay has no second loader: "load").
        "peak_rss_mb": {k: max(p.get(k, 0.0) for p in peaks)
                        for k in dict.fromkeys(k for p in peaks for k in p)} if peaks else None,
        "ceiling": CEILING,
        "ceiling_rows": ceilings[-1]["rows"],
        "ceiling_seconds": round(ceiling, 2),
        "ceiling_rows_per_s": round(rows / ceiling) if ceiling else 0,
        "ceiling_events_per_s": round(events / ceiling) if ceiling else 0,
        "ceiling_runs": [{k: round(v, 2) for k, v in c.items()
                          if k not in ("rows", "runs", "cpu")} for c in ceilings],
        # Where the time went (`CpuSplit`): the median replay's and the median ceiling's.
        "ceiling_cpu": middle_ceiling.get("cpu"),
        "ratio": round(median([c["seconds"] / r["seconds"]
                               for r, c in zip(replays, ceilings, strict=True)]) or 0, 3),
    }
