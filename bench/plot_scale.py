"""`python -m bench.plot_scale [RESULT.json]`: the PNG of a `python -m bench --scale`
result, beside it (same name, `.png`). Default: the newest `bench/results/*-scale*.json`.

Needs matplotlib (`pip install -e '.[bench]'`); the harness itself does not, so the
plot is drawn from the committed JSON, by this script alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # no bench import: matplotlib is all it needs

# (title, y label, [(key, label)], log y)
PANELS: tuple[tuple[str, str, list[tuple[str, str]], bool], ...] = (
    ("Latency at a fixed rate (p95)", "ms", [
        ("command_p95_ms", "command"), ("list_p95_ms", "full list"),
        ("get_p95_ms", "get"), ("history_p95_ms", "history")], False),
    ("Rebuild and catch-up", "events/s", [
        ("replay_events_per_s", "replay"),
        ("catch_up_events_per_s", "projector catch-up")], False),
    ("Replay peak RSS (measured)", "MB", [
        ("replay_peak_rss_mb", "largest process"),
        ("replay_tree_peak_rss_mb", "process tree")], False),
    ("Bytes per unit", "bytes", [
        ("event_store_bytes_per_event", "event store / event"),
        ("read_bytes_per_task", "read tables / task"),
        ("history_bytes_per_event", "history / event"),
        ("idempotency_bytes_per_key", "idempotency / key")], True),
)


def newest() -> Path:
    found = sorted((ROOT / "bench" / "results").glob("*-scale*.json"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit("no bench/results/*-scale*.json: run python -m bench --scale first")
    return found[-1]


def plot(result: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in result["steps"] if "step_seconds" in s]  # not the failed ones
    slopes = result.get("slopes", {})
    sizes = [s["tasks"] for s in steps]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (title, unit, lines, log_y) in zip(axes.flat, PANELS, strict=True):
        for key, label in lines:
            values = [s.get(key) for s in steps]
            if not any(v is not None for v in values):
                continue
            words = slopes.get(key, {}).get("words")
            ax.plot(sizes, values, marker="o",
                    label=f"{label} ({words})" if words else label)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_xlabel("tasks in the store (log scale)")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    run, machine = result["run"], result["machine"]
    fig.suptitle(f"Cost growth, {run['date'][:16]} UTC, {machine['cores']} cores, PostgreSQL"
                 f" {machine['postgres'].split()[0]}; {run['tasks_per_user']:,} tasks per user,"
                 f" {run['rate']:g} req/s", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else newest()
    out = plot(json.loads(path.read_text()), path.with_suffix(".png"))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
