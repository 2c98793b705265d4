"""`python -m bench.pin 1,3 -- command args...`: run a command pinned to those CPUs.

The affinity is set before exec, so every thread the command ever starts inherits it
(no `preexec_fn` in the harness, which runs threads of its own)."""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m bench.pin CPUS -- COMMAND [ARGS...]")
    cpus = {int(c) for c in argv[0].split(",")}
    os.sched_setaffinity(0, cpus)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
