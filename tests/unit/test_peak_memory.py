"""A replay reports its own peak memory, not that of whatever started it
(`projections.progress.peak_rss_mb`): Linux carries a parent's resident size into its
child's `ru_maxrss` at exec, and the benchmark harness that starts `taskctl replay` holds
200 MB or more of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from projections.progress import peak_rss_mb

ROOT = Path(__file__).resolve().parents[2]
# A parent that touches 300 MB, then starts a child that prints its own peak (and the
# ru_maxrss it would have reported before).
PARENT = """
import subprocess, sys
big = bytearray(300 * 1024 * 1024)
for i in range(0, len(big), 4096):
    big[i] = 1
show = ("import resource; from projections.progress import peak_rss_mb;"
        " print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
print(subprocess.run([sys.executable, "-c", show], capture_output=True, text=True,
                     check=True).stdout.strip())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc on this OS")
def test_a_child_of_a_large_process_reports_its_own_peak() -> None:
    out = subprocess.run([sys.executable, "-c", PARENT], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    own, inherited = float(out[0]), float(out[1])
    assert 5 < own < 150  # an interpreter that imported one module, not its parent's 300 MB
    assert inherited >= own


def test_a_process_that_is_gone_has_no_peak() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert peak_rss_mb(child.pid) is None


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="no /proc on this OS")
def test_this_process_has_a_peak() -> None:
    peak = peak_rss_mb()
    assert peak is not None and peak > 5
