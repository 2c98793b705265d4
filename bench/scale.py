"""`python -m bench --scale`: how each cost grows with the size of the store.

For each size (tasks: 10,000, 100,000, 1,000,000 by default; `--scale-sizes`), in a
database of its own (`bench_scale_<tasks>_<random>`, all kept until the end, then dropped
unless `--keep`):

1. **Seed** `users x tasks per user` tasks (1,000 per user: 10, 100, 1,000 users), four
   events each, in the event store's own encoding (`data.event_templates`), written by
   INSERT ... SELECT: created; renamed; completed; then a quarter reopened, a quarter
   deleted, half given a description. So a user's list holds 750 tasks at 1,000 per user.
2. **Replay**: `taskctl replay --json` rebuilds the read tables from the whole store (it
   also fills the live tables the later phases read). Events/s from outside, wall time;
   peak RSS *measured*: the larger of the replay process's and its fold process's peaks
   as `taskctl replay --json` reports them (VmHWM from /proc; not `ru_maxrss` from
   `os.wait4`, which on Linux includes this harness's own size, carried across exec),
   and the sum of the RSS of its whole process tree, sampled from /proc every 0.1 s.
3. **Bytes**: `pg_total_relation_size` of the event store and of every read table,
   per event and per task (again at the end, with `pg_stat_user_tables`' dead and HOT
   rows); at the end also a stored event's size, seeded against written by the API.
4. **Load**, once every store is ready: `--repeats` rounds (default 3) that go from size
   to size in turn (in alternating order), each on the real command API, query API and
   projector started for it (`bench.procs`, pinned like `python -m bench`): an open loop
   at `--rate` req/s (default mix) for `--steady-seconds` (default 20) over up to 100
   users drawn at random from all of them. p95 of the commands together, of a user's
   full list, of get and of history: the median of the rounds' (each round's kept).
5. **Idempotency**: 1,000 keyed creates (closed loop, 4 connections); bytes per key.
6. **Projector catch-up**: the projector stopped, 40,000 events appended (10,000 new
   tasks of the same users, 4 events each), the projector started again; events/s from
   its checkpoint's first move to caught up (and from its start, including start-up).

Then `bench/results/<date>-scale.json` and `.md` (`bench/scale_report.py`: the table, each
line's growth in words, an estimate for the next tenfold size); `python -m
bench.plot_scale` draws the PNG.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import data
from bench.http import Pool, Request, closed_loop, open_loop
from bench.procs import (
    ROOT,
    Processes,
    db_init,
    free_port,
    master_key,
    split_cpus,
    taskctl,
    unpinned,
)
from bench.replay import REPLAY_COMMAND
from bench.report import _f
from bench.scale_report import write_results
from bench.stats import CpuMeter, by_kind, latency_summary, median
from bench.workload import COMMAND_KINDS, OurRequests, Users, mixer, parse_mix
from shared import aio
from shared.catalog import (
    CHECKPOINTS_TABLE,
    EVENTS_TABLE,
    IDEMPOTENCY_TABLE,
    LIVE,
    OWN_POSITIONS_TABLE,
)
from shared.events import decode_event
from shared.settings import Settings

SIZES = (10_000, 100_000, 1_000_000)
TASKS_PER_USER = 1_000
EVENTS_PER_TASK = 4  # what `seed` writes per task
SAMPLE_USERS = 100
KEYED_CREATES = 1_000
CATCH_UP_EVENTS = 40_000
STEADY_SECONDS = 20.0
# Each API's pool at most 5 + 5 connections (defaults 5 + 10): the machine's PostgreSQL
# (max_connections 100) is shared with everyone's work, and 200 req/s never needs more.
SERVER_POOLS = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "5"}
ROUNDS = 3  # load rounds per size (--repeats), interleaved across the sizes
WARMUP_SECONDS = 3.0
READ_TABLES = LIVE.read_tables  # read_tasks, read_task_history, read_user_stats
SIZE_TABLES = (EVENTS_TABLE, *READ_TABLES, IDEMPOTENCY_TABLE, OWN_POSITIONS_TABLE,
               CHECKPOINTS_TABLE)

def owners(users: int) -> list[str]:
    """The user ids `seed` gives its tasks' owners."""
    return [hashlib.md5(f"bench-scale-owner-{k}".encode()).hexdigest() for k in range(users)]


def users_for(tasks: int, tasks_per_user: int) -> int:
    if tasks % tasks_per_user:
        raise ValueError(f"{tasks:,} tasks is not a multiple of {tasks_per_user:,} per user")
    return tasks // tasks_per_user


# Task i (1..n) belongs to user (i - 1) / tasks_per_user: each user's tasks are one run
# of i, so the fourth round's fates (i mod 4) fall evenly on every user. (The replay
# figure's `data.seed_replay_events` deals owners by i mod users instead, which with a
# user count divisible by 4 deletes all the tasks of a quarter of the users.)
_SEED_ROUNDS = (
    ("%(created)s", "'TaskCreated'", "'Scale task ' || i"),
    ("%(title_changed)s", "'TaskTitleChanged'", "'Scale task ' || i || ', renamed'"),
    ("%(completed)s", "'TaskCompleted'", "''"),
    ("CASE mod(i, 4) WHEN 0 THEN %(reopened)s WHEN 1 THEN %(deleted)s"
     " ELSE %(description_changed)s END",
     "CASE mod(i, 4) WHEN 0 THEN 'TaskReopened' WHEN 1 THEN 'TaskDeleted'"
     " ELSE 'TaskDescriptionChanged' END", "''"),
)
_SEED_FILL = (
    "replace(replace(replace(replace(replace({template}, '@@OWNER@@', owner),"
    " '@@TITLE@@', {title}), '@@DESC@@', 'Notes on task ' || i),"
    " '@@REQ@@', 'bench-scale-' || %(round)s::int),"
    " '@@TS@@', to_char((now() - interval '1 day'"
    " + ((%(round)s::bigint * %(n)s::bigint + i) * interval '1 ms')) AT TIME ZONE 'UTC',"
    " 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00')"
)


def seed(settings: Settings, users: int, tasks_per_user: int, *,
         first: int = 0) -> tuple[int, float]:
    """users x tasks_per_user new tasks, EVENTS_PER_TASK events each, in the exact
    encoding of the event store's mapper (`data.event_templates`), written by one
    INSERT ... SELECT per round (created; renamed; completed; then a quarter reopened,
    a quarter deleted, half given a description), each round its own transaction, so a
    task's events are spread along the log as in real use. Titles number the tasks from
    `first` + 1. One task's events are decoded back with `shared.events` as a check.
    (events, seconds)."""
    t = data.event_templates()
    n = users * tasks_per_user
    params = {
        "n": n, "per_user": tasks_per_user, "first": first,
        "created": t["TaskCreated"], "title_changed": t["TaskTitleChanged"],
        "completed": t["TaskCompleted"], "reopened": t["TaskReopened"],
        "deleted": t["TaskDeleted"], "description_changed": t["TaskDescriptionChanged"],
    }
    written = 0
    started = time.perf_counter()
    with connect(settings.require_database_url()) as conn:
        conn.execute(
            "CREATE TEMP TABLE scale_tasks AS SELECT %(first)s::bigint + g AS i,"
            " gen_random_uuid() AS id,"
            " md5('bench-scale-owner-' || ((g - 1) / %(per_user)s::bigint)) AS owner"
            " FROM generate_series(1, %(n)s::bigint) AS g", params)
        for number, (template, topic, title) in enumerate(_SEED_ROUNDS):
            cur = conn.execute(
                f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state)"
                f" SELECT id, {number + 1}, {topic},"
                f" convert_to({_SEED_FILL.format(template=template, title=title)}, 'UTF8')"
                " FROM scale_tasks ORDER BY i", {**params, "round": number})
            written += cur.rowcount
            conn.commit()
        conn.execute(f"ANALYZE {EVENTS_TABLE}")
        sample = conn.execute(
            f"SELECT notification_id, originator_id, originator_version, topic, state"
            f" FROM {EVENTS_TABLE} WHERE originator_id ="
            " (SELECT id FROM scale_tasks ORDER BY i LIMIT 1) ORDER BY originator_version"
        ).fetchall()
        conn.execute("DROP TABLE scale_tasks")
        conn.commit()
    seconds = time.perf_counter() - started
    for row in sample:
        decode_event(*row)  # raises on anything the projector could not read
    assert len(sample) == EVENTS_PER_TASK, sample
    return written, seconds


def connect(url: str, *, patience: float = 60) -> psycopg.Connection[Any]:
    """psycopg.connect, retried while the server has no connection slot free (the
    machine's PostgreSQL is shared: max_connections 100 for everyone's work)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return psycopg.connect(url)
        except psycopg.OperationalError as e:
            if "too many clients" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def head_and_checkpoint(url: str) -> tuple[int, int]:
    """The last event's notification id and the projector's checkpoint (its position),
    as `data.event_count` and `data.checkpoint` read them, on one connection."""
    with connect(url) as conn:
        row = conn.execute(
            f"SELECT (SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}),"
            f" (SELECT coalesce(min(position), 0) FROM {CHECKPOINTS_TABLE})").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# -- replay, with its memory measured ---------------------------------------------------


def _tree_rss_kb(root: int) -> int:
    """Resident memory of `root` and all its descendants, from /proc (kB)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields[21]) * page_kb
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def replay(url: str, secret: str, log_dir: Path, timeout: float) -> dict[str, Any]:
    """`taskctl replay --json` on `url`, timed from outside, its memory measured."""
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT),
           "BETTER_AUTH_SECRET": secret, "ENVIRONMENT": "production",
           "DATA_MASTER_KEY": master_key()}
    out_path, log_path = log_dir / "replay.out", log_dir / "replay.log"
    started = time.perf_counter()
    with open(out_path, "wb") as out, open(log_path, "wb") as log:
        popen = subprocess.Popen(unpinned([*taskctl(), *REPLAY_COMMAND]), cwd=ROOT, env=env,
                                 stdout=out, stderr=log, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    tree_peak_kb = 0
    try:
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                break
            tree_peak_kb = max(tree_peak_kb, _tree_rss_kb(popen.pid))
            if time.perf_counter() - started > timeout:
                os.killpg(popen.pid, signal.SIGKILL)
            time.sleep(0.1)
    except BaseException:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
            os.waitpid(popen.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        raise
    popen.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4
    seconds = time.perf_counter() - started
    if popen.returncode != 0:
        raise RuntimeError(f"taskctl replay failed ({popen.returncode}):\n"
                           f"{log_path.read_text(errors='replace')[-3000:]}")
    summary: Any = None
    lines = out_path.read_text().strip().splitlines()
    if lines:
        try:
            summary = json.loads(lines[-1])
        except ValueError:
            summary = lines[-1][:2000]
    peaks = summary.get("peak_rss_mb") if isinstance(summary, dict) else None
    peak_kb = (max(peaks.values()) * 1024 if peaks
               else usage.ru_maxrss)  # an older taskctl: an upper bound (see above)
    return {"seconds": seconds, "peak_rss_kb": peak_kb,
            "tree_peak_rss_kb": tree_peak_kb, "summary": summary,
            "via": f"taskctl {' '.join(REPLAY_COMMAND)} (wall time, includes start-up)"}


# -- database sizes ---------------------------------------------------------------------


def relation_sizes(url: str) -> dict[str, int]:
    """pg_total_relation_size (heap, indexes, TOAST) of each table, and the database's."""
    with connect(url) as conn:
        out = {}
        for table in SIZE_TABLES:
            row = conn.execute("SELECT coalesce(pg_total_relation_size(to_regclass(%s)), 0)",
                               (table,)).fetchone()
            out[table] = int(row[0]) if row else 0
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        out["database"] = int(row[0]) if row else 0
    return out


def table_stats(url: str) -> dict[str, dict[str, int]]:
    """pg_stat_user_tables' row counters of each table: what updates and deletes leave
    for vacuum (dead tuples) and how many updates were HOT (no index entries)."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT relname, n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd, n_tup_hot_upd,"
            " n_tup_del FROM pg_stat_user_tables WHERE relname = ANY(%s)",
            (list(SIZE_TABLES),)).fetchall()
    names = ("live", "dead", "inserted", "updated", "hot_updated", "deleted")
    return {str(r[0]): dict(zip(names, map(int, r[1:]), strict=True)) for r in rows}


def block_io(url: str) -> dict[str, dict[str, int]]:
    """Per table: blocks of its heap, indexes and TOAST found in shared_buffers (hit) and
    asked of the kernel (read), from pg_statio_user_tables, so far."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT relname, heap_blks_hit + coalesce(idx_blks_hit, 0)"
            " + coalesce(toast_blks_hit, 0) + coalesce(tidx_blks_hit, 0),"
            " heap_blks_read + coalesce(idx_blks_read, 0) + coalesce(toast_blks_read, 0)"
            " + coalesce(tidx_blks_read, 0) FROM pg_statio_user_tables").fetchall()
    return {str(r[0]): {"hit": int(r[1]), "read": int(r[2])} for r in rows}


def io_since(before: dict[str, dict[str, int]],
             after: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The blocks hit and read between two `block_io` readings: in all, and by table
    (the tables that read any)."""
    zero = {"hit": 0, "read": 0}
    tables = {t: {k: v[k] - before.get(t, zero)[k] for k in ("hit", "read")}
              for t, v in after.items()}
    return {"hit": sum(t["hit"] for t in tables.values()),
            "read": sum(t["read"] for t in tables.values()),
            "by_table": {t: v for t, v in sorted(tables.items()) if v["read"] or v["hit"]}}


def row_count(url: str, table: str) -> int:
    with connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


# -- one size ---------------------------------------------------------------------------


class _Timer:
    def __init__(self, into: dict[str, float], phase: str) -> None:
        self.into, self.phase = into, phase

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self.into[self.phase] = round(time.perf_counter() - self.started, 1)


class Step:
    def __init__(self, args: argparse.Namespace, tasks: int, log_dir: Path) -> None:
        self.a = args
        self.tasks = tasks
        self.users = users_for(tasks, args.tasks_per_user)
        self.secret = secrets.token_urlsafe(48)
        self.log_dir = log_dir / f"tasks-{tasks}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.gen_cpus, self.server_cpus = split_cpus(args.cpus)
        self.dbs = data.Databases(args.pg_url, prefix=f"bench_scale_{tasks}")
        self.procs: Processes | None = None
        self.r: dict[str, Any] = {"tasks": tasks, "users": self.users,
                                  "tasks_per_user": args.tasks_per_user,
                                  "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}

    def say(self, text: str) -> None:
        print(f"[scale {time.strftime('%H:%M:%S')} {self.tasks:,}] {text}", flush=True)

    def timed(self, phase: str) -> _Timer:
        return _Timer(self.r.setdefault("phase_seconds", {}), phase)

    def prepare(self) -> None:
        """Its database, seeded, replayed (the live read tables), measured on disk."""
        with self.timed("prepare"):
            self.url = self.dbs.create()
            self.r["database"] = self.url.rsplit("/", 1)[-1]
            self.settings = Settings(environment="production", database_url=self.url,
                                     better_auth_secret=self.secret)
            db_init(self.url)
            self.say(f"seeding {self.users:,} users x {self.a.tasks_per_user:,} tasks"
                     f" x {EVENTS_PER_TASK} events")
            events, seconds = seed(self.settings, self.users, self.a.tasks_per_user)
            self.r.update(events=events, seed_seconds=round(seconds, 1),
                          seed_events_per_s=round(events / seconds))
            self.replay(events)
            self.sizes(events)
            self.users_ = self.sample_users()
            self.seed_head, _ = head_and_checkpoint(self.url)

    def load_round(self, number: int) -> None:
        """One round of the open loop, on servers started for it and stopped after."""
        with self.timed(f"load_round_{number + 1}"):
            failure = ""
            for attempt in (1, 2):
                try:
                    self.start_servers()
                    self.load(number)
                    return
                except Exception as e:  # e.g. no connection slot: once more, then on
                    failure = f"{type(e).__name__}: {e}"[:1000]
                    self.say(f"load round {number + 1}, attempt {attempt} failed: {failure}")
                    time.sleep(5)
                finally:
                    self.stop_servers()
            self.r.setdefault("failed_rounds", []).append({"round": number + 1,
                                                           "error": failure})

    def finish(self) -> None:
        """The idempotency keys' bytes and the projector's catch-up (both append)."""
        with self.timed("finish"):
            try:
                self.start_servers()
                self.keyed_creates()
                self.event_bytes()
                self.catch_up()
            except Exception as e:  # the step's other figures stand
                self.r["failed_finish"] = f"{type(e).__name__}: {e}"[:1000]
                self.say(f"idempotency / catch-up failed: {self.r['failed_finish']}")
            finally:
                self.stop_servers()
            self.r["relation_bytes_end"] = relation_sizes(self.url)
            self.r["table_stats_end"] = table_stats(self.url)
        self.summarise_rounds()
        self.r["step_seconds"] = round(sum(self.r["phase_seconds"].values()), 1)

    def stop_servers(self) -> None:
        if self.procs is not None:
            self.procs.stop_all()
            self.procs = None

    def close(self) -> None:
        self.stop_servers()
        if self.a.keep:
            self.say(f"kept database {self.dbs.created}")
        else:
            self.dbs.drop_all()

    def replay(self, events: int) -> None:
        self.say(f"replay of {events:,} events (taskctl replay)")
        with CpuMeter({}) as cpu:
            r = replay(self.url, self.secret, self.log_dir, timeout=max(300, events / 500))
        self.r.update(
            replay_machine_busy_pct=cpu.result.get("machine_busy_pct"),
            replay_seconds=round(r["seconds"], 1),
            replay_events_per_s=round(events / r["seconds"]),
            replay_peak_rss_mb=round(r["peak_rss_kb"] / 1024, 1),
            replay_tree_peak_rss_mb=round(r["tree_peak_rss_kb"] / 1024, 1),
            replay_summary=r["summary"], replay_via=r["via"],
        )
        self.say(f"replay: {self.r['replay_events_per_s']:,} events/s,"
                 f" peak RSS {self.r['replay_peak_rss_mb']} MB"
                 f" (tree {self.r['replay_tree_peak_rss_mb']} MB)")

    def sizes(self, events: int) -> None:
        s = relation_sizes(self.url)
        read = sum(s[t] for t in READ_TABLES)
        self.r.update(
            relation_bytes=s,
            database_bytes=s["database"],
            event_store_bytes=s[EVENTS_TABLE],
            read_tables_bytes=read,
            event_store_bytes_per_event=round(s[EVENTS_TABLE] / events, 1),
            event_store_bytes_per_task=round(s[EVENTS_TABLE] / self.tasks, 1),
            read_bytes_per_task=round(read / self.tasks, 1),
            read_bytes_per_event=round(read / events, 1),
            history_bytes_per_event=round(s[LIVE.history] / events, 1),
            history_rows=row_count(self.url, LIVE.history),
            read_task_rows=row_count(self.url, LIVE.tasks),
        )

    def start_servers(self) -> None:
        if self.gen_cpus:
            os.sched_setaffinity(0, self.gen_cpus)
        env = {"DATABASE_URL": self.url, "BETTER_AUTH_SECRET": self.secret,
               "ENVIRONMENT": "production", "LOG_LEVEL": self.a.log_level.upper(),
               "DATA_MASTER_KEY": master_key(), **SERVER_POOLS}
        self.procs = Processes(self.log_dir, self.server_cpus, env)
        tc = taskctl()
        self.projector = self.procs.start("projector", [*tc, "projector"])
        self.ports = {}
        for name in ("command-api", "query-api"):
            port = free_port()
            proc = self.procs.start(name, [*tc, name, "--host", "127.0.0.1", "--port", str(port)],
                                    port=port)
            self.ports[name] = port
            self.procs.wait_healthy(proc)
        self.pids = {"generator": os.getpid(),
                     **{p.name: p.pid for p in self.procs.procs if p.pid is not None}}
        self.wait_projector(60)

    def wait_projector(self, timeout: float) -> float:
        """Seconds until the projector's checkpoint reaches the last event."""
        started = time.perf_counter()
        target, _ = head_and_checkpoint(self.url)
        with connect(self.url) as conn:
            while time.perf_counter() - started < timeout:
                if not self.projector.alive():
                    raise RuntimeError(f"the projector exited:\n{self.projector.tail()}")
                row = conn.execute(
                    f"SELECT coalesce(min(position), 0) FROM {CHECKPOINTS_TABLE}").fetchone()
                conn.commit()
                if row and int(row[0]) >= target:
                    return time.perf_counter() - started
                time.sleep(0.05)
        raise RuntimeError(f"the projector did not catch up within {timeout:g}s")

    def sample_users(self) -> Users:
        pick = random.Random(self.tasks).sample(owners(self.users),
                                                min(self.users, SAMPLE_USERS))
        ids: dict[str, list[uuid.UUID]] = {u: [] for u in pick}
        with connect(self.url) as conn:
            rows = conn.execute(f"SELECT user_id, task_id FROM {LIVE.tasks}"
                                " WHERE user_id = ANY(%s) ORDER BY user_id, task_id",
                                (pick,)).fetchall()
        for user, task in rows:
            ids[user].append(task)
        return Users(self.secret, ids)

    def load(self, number: int) -> None:
        a = self.a
        users = self.users_
        mix = parse_mix(a.mix)

        async def drive(seconds: float, seed: int) -> Any:
            command = Pool(self.ports["command-api"], 512)
            query = Pool(self.ports["query-api"], 512)
            build = OurRequests(users, command, query).build
            try:
                return await open_loop(a.rate, seconds, mixer(mix, build), seed=seed)
            finally:
                command.close()
                query.close()

        self.say(f"load round {number + 1}: {a.rate:g} req/s for {a.steady_seconds:g}s over"
                 f" {len(users.users)} users")
        aio.run(lambda: drive(a.warmup, 99 + number))
        io_before = block_io(self.url)
        with CpuMeter(self.pids) as cpu:
            result = aio.run(lambda: drive(a.steady_seconds, 1 + number))
        io = io_since(io_before, block_io(self.url))
        kinds = by_kind(result.samples)
        commands = [s.latency for s in result.samples if s.kind in COMMAND_KINDS and s.ok]
        summary = latency_summary(commands)
        row: dict[str, Any] = {
            "requests": len(result.samples),
            "achieved_rate": round(len(result.samples) / result.elapsed, 1),
            "errors": sum(k["errors"] for k in kinds.values()),
            "error_examples": sorted({e for k in kinds.values() for e in k["error_examples"]})[:3],
            "command_p50_ms": summary["p50_ms"], "command_p95_ms": summary["p95_ms"],
            "command_p99_ms": summary["p99_ms"], "command_count": len(commands),
            "send_lag_p95_ms": latency_summary(result.send_lag)["p95_ms"],
            "kinds": kinds, "cpu": cpu.result,
            "machine_busy_pct": cpu.result.get("machine_busy_pct"),
            "block_io": io,
            "buffer_hit_pct": (round(100 * io["hit"] / (io["hit"] + io["read"]), 2)
                               if io.get("hit", 0) + io.get("read", 0) else None),
        }
        for kind in ("list", "get", "history"):
            row[f"{kind}_p95_ms"] = kinds.get(kind, {}).get("p95_ms")
        self.r.setdefault("load_rounds", []).append(row)
        self.say(f"load round {number + 1}: p95 command {_f(row['command_p95_ms'])}, list"
                 f" {_f(row['list_p95_ms'])}, get {_f(row['get_p95_ms'])}, history"
                 f" {_f(row['history_p95_ms'])} ms; machine busy {row['machine_busy_pct']}%;"
                 f" errors {row['errors']}")

    def summarise_rounds(self) -> None:
        """Each p95 as the median of the rounds' (every round's in `load_rounds`)."""
        rounds = self.r.get("load_rounds", [])
        a = self.a
        self.r.update(rate=a.rate, steady_seconds=a.steady_seconds,
                      sampled_users=len(self.users_.users), rounds=len(rounds),
                      errors=sum(r["errors"] for r in rounds),
                      requests=sum(r["requests"] for r in rounds))
        for key in ("command_p50_ms", "command_p95_ms", "command_p99_ms", "list_p95_ms",
                    "get_p95_ms", "history_p95_ms", "machine_busy_pct", "send_lag_p95_ms",
                    "buffer_hit_pct"):
            values = [r[key] for r in rounds if r.get(key) is not None]
            self.r[key] = median(values)
            self.r[f"{key}_rounds"] = values

    def keyed_creates(self) -> None:
        users, left = self.users_, [KEYED_CREATES]
        self.wait_projector(60)
        before = relation_sizes(self.url)[IDEMPOTENCY_TABLE]
        rows_before = row_count(self.url, IDEMPOTENCY_TABLE)

        def next_request(rng: random.Random) -> Request | None:
            if left[0] <= 0:
                return None
            left[0] -= 1
            user = users.pick(rng)
            return Request("keyed-create", "POST", "/api/tasks",
                           {"Authorization": users.tokens[user],
                            "Idempotency-Key": uuid.uuid4().hex},
                           {"title": users.title(), "description": "Keyed under load"}, (201,))

        r = aio.run(lambda: closed_loop(self.ports["command-api"], 4, 120, next_request,
                                        warmup=0))
        failed = sum(1 for s in r.samples if not s.ok)
        keys = row_count(self.url, IDEMPOTENCY_TABLE) - rows_before
        grown = relation_sizes(self.url)[IDEMPOTENCY_TABLE] - before
        self.r.update(idempotency_keys=keys, idempotency_errors=failed,
                      idempotency_bytes_per_key=round(grown / keys, 1) if keys else None)
        self.say(f"idempotency: {keys:,} keys, {_f(self.r['idempotency_bytes_per_key'])}"
                 " bytes each")

    def event_bytes(self) -> None:
        """Bytes of a stored event's state by topic: the seeded ones (the mapper's
        encoding, text not sealed) against those the command API wrote during the load
        (text sealed with the user's data key, where the service seals it)."""
        with connect(self.url) as conn:
            rows = conn.execute(
                f"SELECT topic, notification_id > %s AS by_api, count(*),"
                f" round(avg(octet_length(state))) FROM {EVENTS_TABLE}"
                f" WHERE notification_id <= %s OR notification_id > %s"
                " GROUP BY 1, 2 ORDER BY 1, 2",
                (self.seed_head, min(self.seed_head, 40_000), self.seed_head)).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for topic, by_api, count, avg in rows:
            out.setdefault(str(topic), {})["api" if by_api else "seeded"] = {
                "events": int(count), "state_bytes": int(avg)}
        self.r["event_state_bytes"] = out

    def catch_up(self) -> None:
        assert self.procs is not None
        self.wait_projector(120)
        self.procs.stop(self.projector)
        per_user = max(1, CATCH_UP_EVENTS // EVENTS_PER_TASK // self.users)
        seed(self.settings, min(self.users, CATCH_UP_EVENTS // EVENTS_PER_TASK // per_user),
             per_user, first=self.tasks)
        target, from_checkpoint = head_and_checkpoint(self.url)
        self.say(f"catch-up: {CATCH_UP_EVENTS:,} events appended; projector restarted")
        started = time.perf_counter()
        self.projector = self.procs.start("projector-catch-up", [*taskctl(), "projector"])
        first_move: tuple[float, int] | None = None
        deadline = started + 60 + CATCH_UP_EVENTS / 200
        machine = CpuMeter({}).__enter__()
        with connect(self.url) as conn:
            while True:
                if not self.projector.alive():
                    raise RuntimeError(f"the projector exited:\n{self.projector.tail()}")
                row = conn.execute(
                    f"SELECT coalesce(min(position), 0) FROM {CHECKPOINTS_TABLE}").fetchone()
                conn.commit()
                now, position = time.perf_counter(), int(row[0]) if row else 0
                if first_move is None and position > from_checkpoint:
                    first_move = (now, position)
                if position >= target:
                    break
                if now > deadline:
                    raise RuntimeError("the projector did not catch up in time")
                time.sleep(0.02)
        done = time.perf_counter()
        machine.__exit__()
        self.r["catch_up_machine_busy_pct"] = machine.result.get("machine_busy_pct")
        with connect(self.url) as conn:
            total, after_first = conn.execute(
                f"SELECT count(*) FILTER (WHERE notification_id > %s),"
                f" count(*) FILTER (WHERE notification_id > %s) FROM {EVENTS_TABLE}",
                (from_checkpoint, first_move[1] if first_move else target)).fetchone()
        moving = done - first_move[0] if first_move else 0.0
        self.r.update(
            catch_up_events=int(total),
            catch_up_seconds=round(done - started, 2),
            catch_up_events_per_s=(round(int(after_first) / moving) if moving > 0 and after_first
                                   else round(int(total) / (done - started))),
            catch_up_events_per_s_with_start=round(int(total) / (done - started)),
        )
        self.say(f"catch-up: {self.r['catch_up_events_per_s']:,} events/s"
                 f" ({self.r['catch_up_events_per_s_with_start']:,} with start-up)")


# -- the curve --------------------------------------------------------------------------


def postgres_settings(url: str) -> dict[str, str]:
    names = ("shared_buffers", "work_mem", "maintenance_work_mem", "max_wal_size",
             "autovacuum", "synchronous_commit", "max_connections")
    with connect(url) as conn:
        rows = conn.execute("SELECT name, current_setting(name) FROM pg_settings"
                            " WHERE name = ANY(%s) ORDER BY name", (list(names),)).fetchall()
    return {str(k): str(v) for k, v in rows}


def machine_info(pg_version: str) -> dict[str, Any]:
    """What `python -m bench` records of the machine (bench/run.py imports this module,
    so this one may not import it back)."""
    with open("/proc/meminfo") as f:
        mem_kb = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), 0)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), "")
    return {"host": platform.node(), "cores": os.cpu_count(), "cpu_model": model,
            "memory_gb": round(mem_kb / 1024 / 1024, 1), "postgres": pg_version,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def configure(args: argparse.Namespace) -> argparse.Namespace:
    if args.tasks_per_user is None:
        args.tasks_per_user = TASKS_PER_USER
    if args.steady_seconds is None:
        args.steady_seconds = STEADY_SECONDS
    if args.warmup is None:
        args.warmup = WARMUP_SECONDS
    if args.repeats is None:
        args.repeats = ROUNDS
    args.sizes = [int(s.replace("_", "")) for s in (args.scale_sizes or "").split(",") if s] \
        or list(SIZES)
    for size in args.sizes:
        users_for(size, args.tasks_per_user)
    return args


def main(args: argparse.Namespace) -> int:
    """The --scale mode of `python -m bench` (bench/run.py parses the arguments)."""
    args = configure(args)

    def terminate(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    log_dir = Path(tempfile.mkdtemp(prefix="taskservice-bench-scale-"))
    admin = data.Databases(args.pg_url)
    r: dict[str, Any] = {
        "run": {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                "command": "python -m bench " + " ".join(sys.argv[1:]),
                "sizes": args.sizes, "tasks_per_user": args.tasks_per_user,
                "events_per_task": EVENTS_PER_TASK, "rate": args.rate,
                "steady_seconds": args.steady_seconds, "rounds": args.repeats,
                "mix": parse_mix(args.mix),
                "sample_users": SAMPLE_USERS, "keyed_creates": KEYED_CREATES,
                "catch_up_events": CATCH_UP_EVENTS, "logs": str(log_dir)},
        "machine": machine_info(admin.server_version()),
        "postgres_settings": postgres_settings(args.pg_url),
        "pinning": {"generator_cpus": "first quarter of the cores (CPU 0 of 2)",
                    "server_cpus": "the rest", "replay": "unpinned",
                    "postgres": "unpinned"} if args.cpus is None else {"cpus": args.cpus},
        "steps": [],
    }
    started = time.perf_counter()
    print(f"[scale] sizes {', '.join(f'{s:,}' for s in args.sizes)} tasks; logs in {log_dir}",
          flush=True)
    # Every store is made first and kept until the end, so that the load rounds can go
    # from size to size in turn (in alternating order): on a shared machine a busy
    # minute then costs every size one round, and the median of the rounds drops it.
    steps = [Step(args, size, log_dir) for size in args.sizes]
    ready: list[Step] = []
    failed = None
    try:
        for step in steps:
            try:
                step.prepare()
                ready.append(step)
            except Exception as e:  # a size too big for the machine: the others go on
                step.r["failed"] = f"{type(e).__name__}: {e}"[:2000]
                step.say(f"failed: {step.r['failed']}")
                step.close()
        for number in range(args.repeats):
            for step in ready if number % 2 == 0 else ready[::-1]:
                step.load_round(number)
        for step in ready:
            step.finish()
    except KeyboardInterrupt:
        failed = "interrupted"
    except Exception as e:  # what was measured is still written, exit status 1
        failed = f"{type(e).__name__}: {e}"[:2000]
    finally:
        for step in steps:
            step.close()
    if failed:
        print(f"[scale] stopped: {failed}", flush=True)
        r["run"]["failed"] = failed
    for step in ready:
        if "step_seconds" not in step.r:  # stopped before its finish: what it measured
            step.summarise_rounds()
            step.r["step_seconds"] = round(sum(step.r.get("phase_seconds", {}).values()), 1)
    r["steps"] = [s.r for s in steps if "step_seconds" in s.r or "failed" in s.r]
    if not any("step_seconds" in s for s in r["steps"]):
        return 130 if failed == "interrupted" else 1
    r["run"]["seconds"] = round(time.perf_counter() - started, 1)
    json_path, md_path = write_results(r, args.results_dir)
    print("\n" + md_path.read_text(), flush=True)
    print(f"[scale] wrote {json_path} and {md_path}; plot: python -m bench.plot_scale"
          f" {json_path}", flush=True)
    return 0 if not failed and all(s.get("errors", 0) == 0 for s in r["steps"]) else 1
