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


def _stat_cpu(stat: str) -> tuple[str, float]:
    """(command name, CPU seconds: utime + stime) of a /proc/<pid>/stat line."""
    name, _, rest = stat.partition(" (")[2].rpartition(") ")
    fields = rest.split()
    return name, (int(fields[11]) + int(fields[12])) / _TICK


def _proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return _stat_cpu(f.read())[1]
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


def _postgres_cpu() -> dict[int, float]:
    """{pid: CPU seconds} of every process on the machine named `postgres` (the server,
    its backends and parallel workers; Linux /proc)."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                name, cpu = _stat_cpu(f.read())
        except (OSError, IndexError, ValueError):
            continue
        if name == "postgres":
            out[int(entry.name)] = cpu
    return out


class CpuSplit:
    """The CPU seconds a phase takes, split by who spent them. `ours`: this process's
    children that ended and were waited for meanwhile, with every descendant they waited
    for (RUSAGE_CHILDREN: a `taskctl replay` run and its loader and fold processes), and
    with `self_too` this process's own CPU as well (a ceiling run in-process).
    `postgres`: every process named postgres on the machine, read from /proc every
    `interval` s by a thread (a process started meanwhile counts from zero; one that
    ends counts to its last reading, so up to `interval` s of its CPU can go unseen).
    `busy`: the whole machine's busy CPU seconds, out of `wall` x `cores`. The sampling
    thread's own CPU is left out of `ours` and `busy`. `result` after the block."""

    def __init__(self, *, self_too: bool = False, interval: float = 0.1) -> None:
        self.self_too = self_too
        self.interval = interval
        self.result: dict[str, float] = {}

    def _ours(self) -> float:
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = children.ru_utime + children.ru_stime
        if self.self_too:
            own = resource.getrusage(resource.RUSAGE_SELF)
            cpu += own.ru_utime + own.ru_stime
        return cpu

    def _sample(self) -> None:
        started = time.thread_time()
        while True:
            for pid, cpu in _postgres_cpu().items():
                # The first reading's processes count from there, later ones from zero.
                self._first.setdefault(pid, 0.0 if self._sampled.is_set() else cpu)
                self._last[pid] = cpu
            if self._stop.is_set():  # that was the reading after the block ended
                break
            self._sampled.set()
            self._stop.wait(self.interval)
        self._sampler_cpu = time.thread_time() - started

    def __enter__(self) -> CpuSplit:
        import threading

        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._sampler_cpu = 0.0
        self._stop, self._sampled = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cpu-split", daemon=True)
        self._thread.start()
        self._sampled.wait()  # the processes already running: counted from here
        self._wall = time.perf_counter()
        self._ours0 = self._ours()
        self._machine0 = _machine_cpu()
        return self

    def __exit__(self, *_: object) -> None:
        wall = time.perf_counter() - self._wall
        ours = self._ours() - self._ours0
        total1, idle1 = _machine_cpu()
        self._stop.set()
        self._thread.join()
        total0, idle0 = self._machine0
        busy = (total1 - total0) - (idle1 - idle0) - self._sampler_cpu
        postgres = sum(self._last[pid] - self._first[pid] for pid in self._last)
        if self.self_too:
            ours -= self._sampler_cpu
        self.result = {
            "wall_s": round(wall, 2), "ours_cpu_s": round(ours, 2),
            "postgres_cpu_s": round(postgres, 2), "busy_cpu_s": round(busy, 2),
            "cores": os.cpu_count() or 1,
            "busy_pct": round(100 * busy / max(total1 - total0, 1e-9), 1),
        }
