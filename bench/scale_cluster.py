"""`python -m bench.scale_cluster [--tasks N] [--rounds R] [--out FILE]`: what keeping each
user's `read_tasks` rows together is worth on a store bigger than `shared_buffers`.

One store of `bench.scale` (default 1,000,000 tasks, rebuilt by `taskctl replay`, its own
database, dropped after), R load rounds as `python -m bench --scale` runs them (default 2),
then `CLUSTER read_tasks USING read_tasks_pkey` and `ANALYZE`, then R rounds more. Prints
(and with --out writes) each round's p95s, shared_buffers hit share and `read_tasks`' block
hits and kernel reads, the CLUSTER's seconds and the table's bytes before and after. The
rounds before and after are not interleaved (the table is rewritten once): read them
beside each round's machine-busy share.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import scale
from bench.run import build_parser


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale_cluster")
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    args = scale.configure(build_parser().parse_args(
        ["--scale", "--scale-sizes", str(a.tasks), "--repeats", str(a.rounds)]))
    step = scale.Step(args, a.tasks, Path(tempfile.mkdtemp(prefix="taskservice-bench-cluster-")))
    out: dict[str, object] = {"tasks": a.tasks, "rounds_each": a.rounds,
                              "command": "python -m bench.scale_cluster " + " ".join(argv)}
    try:
        step.prepare()
        for number in range(a.rounds):
            step.load_round(number)
        out["read_tasks_bytes_before"] = scale.relation_sizes(step.url)["read_tasks"]
        with scale.connect(step.url) as conn:
            conn.autocommit = True
            started = time.perf_counter()
            conn.execute("CLUSTER read_tasks USING read_tasks_pkey")
            conn.execute("ANALYZE read_tasks")
            out["cluster_seconds"] = round(time.perf_counter() - started, 1)
        out["read_tasks_bytes_after"] = scale.relation_sizes(step.url)["read_tasks"]
        for number in range(a.rounds, 2 * a.rounds):
            step.load_round(number)
        keys = ("command_p95_ms", "list_p95_ms", "get_p95_ms", "history_p95_ms",
                "buffer_hit_pct", "machine_busy_pct")
        out["rounds"] = [
            {"clustered": i >= a.rounds, **{k: r.get(k) for k in keys},
             "read_tasks_blocks": r["block_io"]["by_table"].get("read_tasks")}
            for i, r in enumerate(step.r.get("load_rounds", []))]
    finally:
        step.close()
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
