"""`python -m bench.projector_cpu [-n 1500] [--rounds 3]`: CPU time per projector step
when every step carries one event (the live projector under a light, steady load:
each NOTIFY wakes it for an event or two), on the standard asyncio loop and on uvloop.

It seeds n task creations in a scratch database, then projects them with
the runner (`bench.replay_worker.catch_up`, batch_size=1) from an empty checkpoint, once per loop per round
(interleaved), and reports process CPU time per step, median of the rounds. A step is
about a dozen statements (lock the checkpoint, read the safe bound, read the events,
load the states, write three models, save the checkpoint, NOTIFY), so this is mostly the
client's cost of a round trip."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import psycopg

from bench.data import Databases
from bench.procs import db_init
from bench.replay_worker import catch_up
from bench.run import DEFAULT_PG_URL
from shared import aio
from shared.catalog import LIVE
from shared.events import Task
from shared.eventstore import TaskStore, store_env
from shared.settings import Settings

RESET = (
    f"TRUNCATE {', '.join(LIVE.read_tables)};"
    f" UPDATE {LIVE.checkpoints} SET tx_id = '0', position = 0"
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.projector_cpu",
                                description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=1500, help="events (one step each)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL))
    args = p.parse_args(argv)
    dbs = Databases(args.pg_url, prefix="taskservice_projcpu")
    try:
        url = dbs.create()
        settings = Settings(environment="test", database_url=url, better_auth_secret="b" * 40)
        db_init(url)
        store = TaskStore(env=store_env(settings))  # the library's own writer
        store.save(*(Task.create(owner=f"u{i % 20}", title=f"t{i}", description=None,
                                 actor="bench", request_id="bench") for i in range(args.n)))
        store.close()
        runners = {
            "asyncio": lambda: asyncio.run(catch_up(url, batch_size=1)),
            "uvloop": lambda: aio.run(lambda: catch_up(url, batch_size=1)),
        }
        results: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, project in runners.items():
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(RESET)
                started = time.process_time()
                project()
                results[name].append((time.process_time() - started) / args.n)
    finally:
        dbs.drop_all()
    print(f"CPU per one-event projector step, median of {args.rounds} x {args.n} steps")
    base = statistics.median(results["asyncio"])
    for name, values in results.items():
        m = statistics.median(values)
        runs = ", ".join(f"{v * 1e6:.0f}" for v in values)
        print(f"{name:<8} {m * 1e6:>7.0f} us  {m / base:.2f}x  [{runs}]")


if __name__ == "__main__":
    main()
