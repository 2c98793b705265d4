"""Percentiles, medians and CPU accounting for the results."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.http import Sample


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def latency_summary(latencies: Sequence[float]) -> dict[str, Any]:
    return {
        "p50_ms": ms(percentile(latencies, 50)),
        "p95_ms": ms(percentile(latencies, 95)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies) if latencies else None),
    }


def by_kind(samples: Iterable[Sample]) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.kind, []).append(s)
    out = {}
    for kind, group in groups.items():
        ok = [s.latency for s in group if s.ok]
        errors = [s for s in group if not s.ok]
        out[kind] = {
            "count": len(group),
            "errors": len(errors),
            "error_examples": sorted({s.error for s in errors})[:3],
            **latency_summary(ok),
        }
    return out


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(ours: float | None, ceiling: float | None) -> float | None:
    if ours is None or not ceiling:
        return None
    return round(ours / ceiling, 3)


# -- CPU -----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def _machine_cpu() -> tuple[float, float]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) / _TICK, idle / _TICK


@dataclass
class CpuMeter:
    """CPU used during a phase: per process (as % of one core), and the machine's busy %."""

    pids: dict[str, int]

    def __enter__(self) -> CpuMeter:
        self.wall = time.perf_counter()
        self.proc = {name: _proc_cpu(pid) for name, pid in self.pids.items()}
        self.machine = _machine_cpu()
        self.result: dict[str, float | None] = {}
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.perf_counter() - self.wall
        for name, pid in self.pids.items():
            before, after = self.proc[name], _proc_cpu(pid)
            self.result[f"{name}_core_pct"] = (
                None if before is None or after is None else round(100 * (after - before) / wall, 1)
            )
        total0, idle0 = self.machine
        total1, idle1 = _machine_cpu()
        busy = (total1 - total0) - (idle1 - idle0)
        self.result["machine_busy_pct"] = round(100 * busy / max(total1 - total0, 1e-9), 1)
