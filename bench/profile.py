"""`python -m bench.profile [--kinds create,list] [--seconds 10]`: where the time goes.

Sets up like the benchmark (smaller data by default), then for each kind drives the
saturation load at the server that answers it while `py-spy` samples that process
(`py-spy` is a developer tool, not a dependency: `pip install py-spy`), and prints
the hottest functions, by own time and by inclusive time, with the raw stacks saved
beside the benchmark's logs. `--kinds replay` profiles a rebuild instead.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import data
from bench.http import Pool, closed_loop
from bench.procs import db_init
from bench.run import Bench, build_parser, configure
from bench.workload import QUERY_KINDS, OurRequests
from shared import aio


def summarise(raw: Path, top: int = 25) -> str:
    """Own and inclusive sample shares of the functions in py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [f.split(" (", 1)[0] + " (" + f.split(" (", 1)[1].split(":")[0].rsplit("/", 1)[-1]
                  if " (" in f else f for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "own time:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines += ["inclusive time:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in inclusive.most_common(top)]
    return "\n".join(lines)


def record(pid: int, seconds: float, out: Path, idle: bool = False) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250", "-f", "raw",
         "-o", str(out), *(["--idle"] if idle else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("--kinds", default="create,update,list,get")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--tasks-per-user", type=int, default=1000)
    p.add_argument("--replay-events", type=int, default=100_000)
    p.add_argument("--pg-url")
    p.add_argument("--no-projector-wait", action="store_true",
                   help="profile commands even when the projector cannot keep up or run")
    p.add_argument("--idle", action="store_true",
                   help="sample waiting threads too (where requests wait, not what burns CPU)")
    own = p.parse_args(argv)
    bench_argv = ["--users", str(own.users), "--tasks-per-user", str(own.tasks_per_user)]
    if own.pg_url:
        bench_argv += ["--pg-url", own.pg_url]
    args = configure(build_parser().parse_args(bench_argv))
    bench = Bench(args)
    kinds = own.kinds.split(",")
    if own.no_projector_wait:
        bench.wait_projector = lambda timeout: True  # type: ignore[method-assign]
    try:
        bench.setup()
        for kind in [k for k in kinds if k != "replay"]:
            server = bench.servers["query-api" if kind in QUERY_KINDS else "command-api"]
            assert server.pid is not None and server.port is not None
            out = bench.log_dir / f"profile-{kind}.txt"
            spy = record(server.pid, own.seconds, out, own.idle)
            ours = OurRequests(bench.users, Pool(0, 0), Pool(0, 0))

            def next_request(rng, kind=kind, ours=ours):
                built = ours.build(kind, rng)
                return None if built is None else built[1]

            result = aio.run(lambda p=server.port, n=next_request: closed_loop(
                p, args.connections, own.seconds - 1, n, warmup=0.5))
            spy.wait(own.seconds + 30)
            ok = sum(1 for s in result.samples if s.ok)
            print(f"\n=== {kind}: {ok / result.window:.0f} req/s under py-spy; {out}")
            print(summarise(out))
            bench.wait_projector(timeout=60)
        if "replay" in kinds:
            bench.stop_servers()
            url = bench.dbs.create("replay")
            from shared.settings import Settings

            db_init(url)
            data.seed_replay_events(Settings(database_url=url, better_auth_secret=bench.secret),
                                    own.replay_events)
            out = bench.log_dir / "profile-replay.txt"
            worker = subprocess.Popen(
                [sys.executable, "-m", "bench.replay_worker", url],
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                stdout=subprocess.PIPE, text=True,
            )
            time.sleep(0.3)
            spy = record(worker.pid, 600, out)
            stdout, _ = worker.communicate(timeout=600)
            spy.wait(30)
            print(f"\n=== replay: {stdout.strip()}; {out}")
            print(summarise(out))
    finally:
        bench.teardown()


if __name__ == "__main__":
    main()
