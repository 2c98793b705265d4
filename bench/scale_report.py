"""The results of `python -m bench --scale` (bench/scale.py): each line's growth in
words, an estimate for ten times the largest size, and `<date>-scale.json` / `.md`.
Pure functions of the result's JSON (the plot is `bench/plot_scale.py`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import _f, _md_table

# The promised columns: (key in a step's record, header of the table).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("tasks", "tasks"),
    ("users", "users"),
    ("events", "events"),
    ("command_p95_ms", "command p95 (ms)"),
    ("list_p95_ms", "full list p95 (ms)"),
    ("get_p95_ms", "get p95 (ms)"),
    ("history_p95_ms", "history p95 (ms)"),
    ("machine_busy_pct", "machine busy during load (%)"),
    ("buffer_hit_pct", "shared_buffers hits during load (%)"),
    ("catch_up_events_per_s", "projector catch-up (events/s)"),
    ("replay_events_per_s", "replay (events/s)"),
    ("replay_peak_rss_mb", "replay peak RSS, largest process (MB)"),
    ("replay_tree_peak_rss_mb", "replay peak RSS, process tree (MB)"),
    ("event_store_bytes_per_event", "event store bytes/event"),
    ("read_bytes_per_task", "read tables bytes/task"),
    ("history_bytes_per_event", "history bytes/event"),
    ("idempotency_bytes_per_key", "idempotency bytes/key"),
    ("database_bytes", "database (MB)"),
    ("seed_seconds", "seed (s)"),
    ("replay_seconds", "replay (s)"),
    ("step_seconds", "step (s)"),
)
# The lines whose growth the results state in words.
SLOPE_METRICS = ("command_p95_ms", "list_p95_ms", "get_p95_ms", "history_p95_ms",
                 "catch_up_events_per_s", "replay_events_per_s", "replay_peak_rss_mb",
                 "replay_tree_peak_rss_mb", "event_store_bytes_per_event",
                 "read_bytes_per_task", "history_bytes_per_event", "idempotency_bytes_per_key",
                 "database_bytes", "replay_seconds")


def _num(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def growth(sizes: Sequence[float], values: Sequence[float | None]) -> dict[str, Any]:
    """How `values` grow with `sizes`, in words, from the exponent b of value ~ size^b
    between the first and the last point: no steady trend (three or more points that go
    up and down by more than 1.5x), flat (|b| < 0.1), linear (b >= 0.85), falling
    inversely (b <= -0.85), linear above a fixed base (a steady step per task), logarithmic
    (a steady step per tenfold size), or a power law. Each step's own exponent is kept."""
    points = [(s, v) for s, v in zip(sizes, values, strict=True) if v]
    if len(points) < 2:
        return {"exponent": None, "words": "not measured"}
    (s0, v0), (s1, v1) = points[0], points[-1]
    pairs = list(zip(points, points[1:], strict=False))
    b = math.log(v1 / v0) / math.log(s1 / s0)
    per_decade = (v1 - v0) / math.log10(s1 / s0)
    steps = [(vb - va) / math.log10(sb / sa) for (sa, va), (sb, vb) in pairs]
    per_task = [(vb - va) / (sb - sa) for (sa, va), (sb, vb) in pairs]
    each = [round(math.log(vb / va) / math.log(sb / sa), 3) for (sa, va), (sb, vb) in pairs]
    ys = [v for _, v in points]
    if (len(points) >= 3 and max(ys) > 1.5 * min(ys)
            and not (all(x > 0 for x in steps) or all(x < 0 for x in steps))):
        words = f"no steady trend (between {_num(min(ys))} and {_num(max(ys))})"
    elif abs(b) < 0.1:
        words = "flat"
    elif b >= 0.85:
        words = "linear"
    elif b <= -0.85:
        words = "falls linearly (inversely proportional)"
    elif (len(points) >= 3 and b >= 0.25 and all(x > 0 for x in per_task)
          and max(per_task) <= 1.5 * min(per_task)):
        words = f"linear above a fixed base (+{per_task[-1] * 1000:,.3g} per 1,000 tasks)"
    elif (len(steps) >= 2 and all(x * per_decade > 0 for x in steps)
          and max(abs(x) for x in steps) <= 2.5 * min(abs(x) for x in steps)):
        sign = "+" if per_decade > 0 else ""
        words = f"logarithmic ({sign}{per_decade:,.3g} per tenfold)"
    else:
        words = f"power law, exponent {b:.2f}"
    return {"exponent": round(b, 3), "per_tenfold": round(per_decade, 3),
            "exponent_per_step": each, "words": words}


LATENCIES = ("command_p95_ms", "list_p95_ms", "get_p95_ms", "history_p95_ms")


def slopes(steps: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each line's growth over the steps. The latencies only over the steps whose load
    had as many users as the largest (a step with fewer users, such as 10 users of
    1,000 tasks for 10,000 tasks, sends each user more of the same request rate)."""
    most = max((s.get("sampled_users") or 0 for s in steps), default=0)
    alike = [s for s in steps if (s.get("sampled_users") or 0) == most]
    out = {}
    for metric in SLOPE_METRICS:
        over = alike if metric in LATENCIES and len(alike) >= 2 else steps
        out[metric] = growth([s["tasks"] for s in over], [s.get(metric) for s in over])
        if over is not steps and len(over) < len(steps):
            sizes = ", ".join(f"{step['tasks']:,}" for step in over)
            out[metric]["over"] = f"the steps with {most} users under load ({sizes} tasks)"
    return out


def estimate_next(steps: Sequence[dict[str, Any]], factor: int = 10) -> dict[str, Any] | None:
    """An *estimate* for `factor` x the largest measured size from the two largest steps,
    as a range: the straight line through them (low, usually) and the power law through
    them (time and bytes at least in proportion); each figure is the range's top, its
    `_range` both ends. Seconds of seeding, replay and the whole step; the disk the
    database needs (its size, plus a second set of read tables while replay rebuilds
    beside the live ones); replay's peak RSS."""
    if len(steps) < 2:
        return None
    a, b = steps[-2], steps[-1]
    target = b["tasks"] * factor
    ranges: dict[str, tuple[float, float]] = {}

    def scale(key: str) -> float:
        if not a.get(key) or not b.get(key):
            return 0.0
        line = b[key] + (b[key] - a[key]) / (b["tasks"] - a["tasks"]) * (target - b["tasks"])
        exponent = math.log(b[key] / a[key]) / math.log(b["tasks"] / a["tasks"])
        power = b[key] * factor ** (exponent if key.endswith("_mb") else max(exponent, 1.0))
        ranges[key] = (round(min(line, power), 1), round(max(line, power), 1))
        return max(line, power)

    fixed = b["step_seconds"] - b["seed_seconds"] - b["replay_seconds"]
    seed_s, replay_s = scale("seed_seconds"), scale("replay_seconds")
    database = scale("database_bytes")
    read = scale("read_tables_bytes")
    rss, tree = scale("replay_peak_rss_mb"), scale("replay_tree_peak_rss_mb")
    return {
        "tasks": target, "events": b["events"] * factor,
        "seed_seconds": round(seed_s), "replay_seconds": round(replay_s),
        "step_seconds": round(seed_s + replay_s + fixed),
        "database_bytes": round(database),
        "disk_peak_bytes": round(database + read),
        "replay_peak_rss_mb": round(rss, 1), "replay_tree_peak_rss_mb": round(tree, 1),
        **{f"{k}_range": v for k, v in ranges.items()},
        "method": f"from the {a['tasks']:,}- and {b['tasks']:,}-task steps: the straight"
                  " line through them and the power law through them (at least in"
                  " proportion for time and bytes), the higher of the two; an estimate, not"
                  " a measurement",
    }


def _span(est: dict[str, Any], key: str, unit: float) -> str:
    low, high = est.get(f"{key}_range") or (est.get(key, 0), est.get(key, 0))
    return f"{low / unit:,.1f}-{high / unit:,.1f}" if unit != 1 else f"{low:,.0f}-{high:,.0f}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f} MB"


def _cell(key: str, value: Any) -> str:
    if key == "database_bytes" and value is not None:
        return _f(value / 1e6, 1)
    return _f(value)


def render_md(r: dict[str, Any]) -> str:
    m, run = r["machine"], r["run"]
    steps = r["steps"]
    tables = [t for t in next((s["relation_bytes"] for s in steps if "relation_bytes" in s), {})
              if t != "database"]
    lines = [
        f"# Cost growth, {run['date']} on {m['host']}", "",
        f"`{run['command']}`, {run.get('seconds')} s. {m['cores']} cores ({m['cpu_model']}),"
        f" {m['memory_gb']} GB, PostgreSQL {m['postgres']}, Python {m['python']}; load"
        f" average at start {m['load_average_at_start']}. PostgreSQL settings:"
        f" {', '.join(f'{k}={v}' for k, v in r.get('postgres_settings', {}).items())}.", "",
        f"Each step: its own database; {run['tasks_per_user']:,} tasks per user,"
        f" {run.get('events_per_task', 4)} events per task (a quarter of the tasks deleted);"
        f" load: an open loop of {run['rate']:g} req/s for {run['steady_seconds']:g} s"
        f" (default mix) over up to {run.get('sample_users', 100)} users,"
        f" {run.get('rounds', 1)} rounds going from size to size in turn, each p95 the median"
        f" of the rounds'; {run.get('keyed_creates', 1000):,} keyed creates; projector"
        f" catch-up of {run.get('catch_up_events', 40000):,} appended events. Replay RSS"
        " measured (the VmHWM of each of its processes, the largest, as `taskctl replay"
        " --json` reports them: the replay's, a second loader's from 100,000 events, the"
        " fold's; the tree's sum sampled from /proc).", "",
        _md_table([h for _, h in COLUMNS], [[_cell(k, s.get(k)) for k, _ in COLUMNS]
                                            for s in steps]),
        "", "## Bytes on disk per table (pg_total_relation_size: heap, indexes, TOAST)", "",
        _md_table(["tasks", *tables, "database"],
                  [[_f(s["tasks"]), *(_mb(s.get("relation_bytes", {}).get(t))
                                      for t in (*tables, "database"))]
                   for s in steps]),
        "", "## How each line grows", "",
        _md_table(["figure", "exponent b (value ~ tasks^b)", "in words"],
                  [[dict(COLUMNS).get(k, k), _f(v["exponent"], 3),
                    v["words"] + (f" (over {v['over']})" if v.get("over") else "")]
                   for k, v in r["slopes"].items()]),
    ]
    est = r.get("estimate_next")
    if est:
        lines += [
            "", f"## {est['tasks']:,} tasks: an estimate (a documented manual run)", "",
            f"Seeding {_span(est, 'seed_seconds', 60)} min, replay"
            f" {_span(est, 'replay_seconds', 60)} min, the whole step up to"
            f" {est['step_seconds'] / 60:,.0f} min; database"
            f" {_span(est, 'database_bytes', 1e9)} GB, peak disk during the replay up to"
            f" {est['disk_peak_bytes'] / 1e9:,.1f} GB (plus WAL up to max_wal_size); replay"
            f" peak RSS {_span(est, 'replay_peak_rss_mb', 1)} MB in its largest process,"
            f" {_span(est, 'replay_tree_peak_rss_mb', 1)} MB in its process tree."
            f" Method: {est['method']}.",
        ]
    return "\n".join(lines) + "\n"


def result_paths(results_dir: Path, date: str) -> tuple[Path, Path]:
    stem, n = f"{date}-scale", 1
    while (results_dir / f"{stem}.json").exists():
        n += 1
        stem = f"{date}-scale-{n}"
    return results_dir / f"{stem}.json", results_dir / f"{stem}.md"


def write_results(r: dict[str, Any], results_dir: Path) -> tuple[Path, Path]:
    measured = [s for s in r["steps"] if "step_seconds" in s]
    r["slopes"] = slopes(measured)
    r["estimate_next"] = estimate_next(measured)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = result_paths(results_dir, r["run"]["date"][:10])
    json_path.write_text(json.dumps(r, indent=2) + "\n")
    md_path.write_text(render_md(r))
    return json_path, md_path
