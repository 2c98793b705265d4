"""The replay's process gets every core, whatever the harness is pinned to
(`bench.procs.unpinned`): a child inherits its parent's CPU affinity, and the harness
pins itself to the load generator's CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A parent pinned to CPU 0, as the harness pins itself, starting one child as it is and
# one through `unpinned`; each child prints its affinity.
PARENT = """
import os, subprocess, sys
from bench.procs import unpinned
os.sched_setaffinity(0, {0})
show = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
for argv in (show, unpinned(show)):
    print(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip())
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_a_replay_started_by_a_pinned_harness_runs_on_every_cpu() -> None:
    out = subprocess.run([sys.executable, "-c", PARENT], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split("\n")
    assert out[0] == "[0]"  # inherited: what the replay got before
    assert out[1] == str(list(range(os.cpu_count() or 1)))
