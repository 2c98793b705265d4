"""Progress of a long command on stderr: a redrawn bar on a terminal, else a plain line
every few seconds (logs and CI keep a readable record); and the peak memory of its
processes. Standard library only."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """A process's peak resident memory in MB: `VmHWM` of /proc/<pid>/status (Linux);
    None where there is no /proc, or the process is gone. Not `ru_maxrss`: Linux carries
    a parent's resident size into its child's `ru_maxrss` at exec, so a program started
    by a large process reports at least that process's size."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressReport:
    """Call with (done, total) as work advances; `finish()` ends the bar's line."""

    def __init__(self, label: str, stream: TextIO | None = None, *, every: float = 5.0,
                 width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = 0.1 if self.tty else every
        self.width = width
        self.started = time.monotonic()
        self.last = 0.0
        self.drawn = False

    def line(self, done: int, total: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        left = (total - done) / rate if rate and total > done else 0.0
        share = min(1.0, done / total) if total else 1.0
        text = (f"{self.label}: {done:,}/{total:,} events ({share:.0%})  {rate:,.0f} events/s"
                f"  left {_duration(left)}")
        if self.tty:
            filled = int(share * self.width)
            text = f"[{'#' * filled}{'.' * (self.width - filled)}] {text}"
        return text

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(done, total))
            self.drawn = True
        else:
            self.stream.write(self.line(done, total) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
