"""The benchmark's databases and data.

- `Databases`: a dedicated `taskservice_bench_<random>` database (and a scratch one
  for the replay), created on the given server and dropped at the end.
- `seed_tasks`: the users' tasks, built as `shared.events.Task` aggregates and saved
  through `shared.eventstore` many at a time (the store's own path, minus HTTP).
- `seed_replay_events`: a large, realistic event log for the replay figure, in the
  exact encoding of the event store's mapper but written by INSERT ... SELECT, because
  `store.save` manages ~8,000 events/s and the replay log is a million.
- `fill_ceiling`: the ceiling app's tables, same users and task ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from bench import ceiling_app
from bench.stats import CpuSplit
from shared.catalog import EVENTS_TABLE
from shared.events import EVENT_TOPICS, Task, decode_event
from shared.eventstore import TaskStore, store_env
from shared.settings import Settings, database_url, postgres_params

SEED_REQUEST_ID = "bench-seed"


class Databases:
    def __init__(self, admin_url: str, prefix: str = "taskservice_bench") -> None:
        self.admin_url = admin_url
        self.prefix = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.created: list[str] = []

    def create(self, suffix: str = "") -> str:
        name = self.prefix + (f"_{suffix}" if suffix else "")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return database_url(self.admin_url, dbname=name)

    def drop(self, url: str) -> None:
        name = postgres_params(url)["dbname"]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            self.drop(database_url(self.admin_url, dbname=name))

    def server_version(self) -> str:
        with psycopg.connect(self.admin_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


def seed_tasks(
    settings: Settings, users: Sequence[str], tasks_per_user: int, *, chunk: int = 5000
) -> tuple[dict[str, list[UUID]], float]:
    """Every user's tasks, saved through the event store; (ids per user, seconds)."""
    ids: dict[str, list[UUID]] = {u: [] for u in users}
    store = TaskStore(env=store_env(settings))  # the library's own writer
    started = time.perf_counter()
    try:
        batch: list[Task] = []
        for user in users:
            for i in range(tasks_per_user):
                task = Task.create(
                    owner=user,
                    title=f"Benchmark task {i}",
                    description="Seeded by the benchmark harness" if i % 2 else None,
                    actor=user,
                    request_id=SEED_REQUEST_ID,
                )
                ids[user].append(task.id)
                batch.append(task)
                if len(batch) >= chunk:
                    store.save(*batch)
                    batch.clear()
        if batch:
            store.save(*batch)
    finally:
        store.close()
    return ids, time.perf_counter() - started


_PLACEHOLDERS = {"owner": "@@OWNER@@", "title": "@@TITLE@@", "description": "@@DESC@@",
                 "request_id": "@@REQ@@"}


def event_templates() -> dict[str, str]:
    """One stored event of each topic, encoded by the event store's own mapper, with
    placeholders where a task's values and its timestamp go."""
    p = _PLACEHOLDERS
    app = TaskStore(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})  # the mapper only
    try:
        first = Task.create(owner=p["owner"], title=p["title"], description=None,
                            actor=p["owner"], request_id=p["request_id"])
        second = Task.create(owner=p["owner"], title="x", description=None,
                             actor=p["owner"], request_id=p["request_id"])
        stamp = {"actor": p["owner"], "request_id": p["request_id"]}
        second.change(title=p["title"], description=p["description"], set_description=True,
                      completed=True, **stamp)
        second.change(completed=False, **stamp)
        second.change(priority="high", tags=["bench"], due_date=datetime(2030, 1, 1, tzinfo=UTC),
                      set_due_date=True, **stamp)
        second.delete(**stamp)
        templates = {}
        for event in [*first.collect_events(), *second.collect_events()[1:]]:
            stored = app.mapper.to_stored_event(event)
            state = stored.state.decode()
            templates[stored.topic] = re.sub(r'"_data_":"[^"]+"', '"_data_":"@@TS@@"', state,
                                             count=1)
    finally:
        app.close()
    assert set(templates) == set(EVENT_TOPICS), templates
    return templates


def seed_replay_events(settings: Settings, total: int, users: int = 100) -> tuple[int, float]:
    """About `total` events over total/4 tasks of `users` users, in four rounds so a
    task's events are spread along the log as in real use: created; renamed; completed;
    then a quarter reopened, a quarter deleted, half given a description. (events, s).

    Written by four INSERT ... SELECT statements from templates that the event store's
    mapper encoded (`event_templates`): `store.save` manages ~8,000 events/s, too slow
    for a million. A sample is decoded back with `shared.events` as a check."""
    t = event_templates()
    n = max(1, total // 4)
    url = settings.require_database_url()
    ts = (
        "to_char((now() - interval '1 day'"
        " + ((%(round)s::bigint * %(n)s::bigint + i) * interval '1 ms'))"
        " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+00:00'"
    )
    fill = (
        "replace(replace(replace(replace(replace({template}, '@@OWNER@@', owner),"
        " '@@TITLE@@', {title}), '@@DESC@@', 'Notes on task ' || i),"
        " '@@REQ@@', 'bench-replay-' || %(round)s), '@@TS@@', " + ts + ")"
    )
    rounds = [
        ("%(created)s", "'TaskCreated'", "'Replay task ' || i"),
        ("%(title_changed)s", "'TaskTitleChanged'", "'Replay task ' || i || ', renamed'"),
        ("%(completed)s", "'TaskCompleted'", "''"),
        ("CASE mod(i, 4) WHEN 0 THEN %(reopened)s WHEN 1 THEN %(deleted)s"
         " ELSE %(description_changed)s END",
         "CASE mod(i, 4) WHEN 0 THEN 'TaskReopened' WHEN 1 THEN 'TaskDeleted'"
         " ELSE 'TaskDescriptionChanged' END", "''"),
    ]
    params = {
        "n": n, "users": users,
        "created": t["TaskCreated"], "title_changed": t["TaskTitleChanged"],
        "completed": t["TaskCompleted"], "reopened": t["TaskReopened"],
        "deleted": t["TaskDeleted"], "description_changed": t["TaskDescriptionChanged"],
    }
    started = time.perf_counter()
    with psycopg.connect(url) as conn:
        conn.execute(
            "CREATE TEMP TABLE replay_tasks AS SELECT i, gen_random_uuid() AS id,"
            # Four consecutive tasks per owner: each user gets every kind of the fourth round
            # (i mod users would give a quarter of the users only deleted tasks when
            # users is a multiple of 4).
            " md5('bench-replay-owner-' || mod(i / 4, %(users)s)) AS owner"
            " FROM generate_series(1, %(n)s) AS i",
            params,
        )
        for number, (template, topic, title) in enumerate(rounds):
            conn.execute(
                f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state)"
                f" SELECT id, {number + 1}, {topic},"
                f" convert_to({fill.format(template=template, title=title)}, 'UTF8')"
                " FROM replay_tasks ORDER BY i",
                {**params, "round": number},
            )
            conn.commit()
        conn.execute(f"ANALYZE {EVENTS_TABLE}")
        written = conn.execute(f"SELECT count(*) FROM {EVENTS_TABLE}").fetchone()[0]
        sample = conn.execute(
            f"SELECT DISTINCT ON (topic) notification_id, originator_id, originator_version,"
            f" topic, state FROM {EVENTS_TABLE} ORDER BY topic, notification_id"
        ).fetchall()
    seconds = time.perf_counter() - started
    for row in sample:
        decode_event(*row)  # raises on anything the projector could not read
    return int(written), seconds


def fill_ceiling(url: str, ids: dict[str, list[UUID]]) -> None:
    """The ceiling app's tables: the same users and task ids as the seeded tasks, and
    one history row per task (as the projector writes for a created task)."""
    users = [u for u, tasks in ids.items() for _ in tasks]
    tasks = [t for ts in ids.values() for t in ts]
    with psycopg.connect(url) as conn:
        for statement in ceiling_app.ddl():
            conn.execute(statement)
        conn.execute(ceiling_app.fill_with_ids_sql().replace("$1", "%s").replace("$2", "%s"),
                     (users, tasks))
        conn.execute(ceiling_app.fill_history_sql())
        conn.execute("ANALYZE " + ceiling_app.READ_TABLE)
        conn.execute("ANALYZE " + ceiling_app.HISTORY_TABLE)


def analyze(url: str) -> None:
    """Statistics for every table, as autovacuum gives any long-running deployment:
    the ceiling's tables are analyzed when filled, and a read's plan (an index scan by
    primary key, not a bitmap scan guessed for a table without statistics) must not
    depend on whether autovacuum came by after the projector caught up."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")


def event_count(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT coalesce(max(notification_id), 0) FROM {EVENTS_TABLE}").fetchone()
    return int(row[0]) if row else 0


def checkpoint(url: str) -> int:
    from shared.catalog import CHECKPOINTS_TABLE as CHECKPOINTS

    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT coalesce(min(position), 0) FROM {CHECKPOINTS}").fetchone()
    return int(row[0]) if row else 0


def copy_ceiling(url: str, repeats: int) -> dict[str, Any]:
    """The replay's ceiling, on the database a replay has just rebuilt: the rows it wrote
    (every row of the live read tables: tasks, history, stats), dumped once with
    `COPY ... TO STDOUT (FORMAT binary)` into temporary files (not timed), then, per
    repetition, COPYed back (`COPY ... FROM STDIN (FORMAT binary)`, one connection,
    `synchronous_commit = off` as the replay's) into fresh tables made as the replay
    makes them (`projections.manifest.load_ddl`), then given the same keys and indexes,
    built the same way (`projections.replay.build_keys_and_indexes`: its sessions at
    once, the replay's settings). Timed: the COPYs and the builds, with the CPU they take
    (`cpu`: `bench.stats.CpuSplit`, this process's and PostgreSQL's). Returns the rows,
    the median repetition's seconds (`copy`, `keys_and_indexes`, `seconds`) and CPU, and
    every repetition's (`runs`)."""
    from projections.manifest import READ_MODELS, load_ddl, table_names
    from projections.replay import build_keys_and_indexes
    from shared.catalog import LIVE

    bare = replace(LIVE, checkpoints="bench_ceiling_checkpoints",
                   **{m.TABLE: f"bench_ceiling_{m.TABLE}" for m in READ_MODELS})
    runs: list[dict[str, float]] = []
    with contextlib.ExitStack() as files, psycopg.connect(url, autocommit=True) as conn:
        dumps = {}
        for name in table_names(LIVE):
            f = files.enter_context(tempfile.TemporaryFile())
            with conn.cursor().copy(f"COPY {name} TO STDOUT (FORMAT binary)") as copy:
                for chunk in copy:
                    f.write(chunk)
            dumps[name] = f
        rows = {name: int(conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0])
                for name in table_names(LIVE)}
        conn.execute("SET synchronous_commit = off")
        for _ in range(repeats):
            for name in [*table_names(bare), bare.checkpoints]:
                conn.execute(f"DROP TABLE IF EXISTS {name}")
            for statement in load_ddl(bare):
                conn.execute(statement)
            with CpuSplit(self_too=True) as cpu:
                started = time.perf_counter()
                for live, new in zip(table_names(LIVE), table_names(bare), strict=True):
                    f = dumps[live]
                    f.seek(0)
                    with conn.cursor().copy(f"COPY {new} FROM STDIN (FORMAT binary)") as copy:
                        while chunk := f.read(1 << 20):
                            copy.write(chunk)
                copied = time.perf_counter()
                asyncio.run(build_keys_and_indexes(url, bare))
                done = time.perf_counter()
            runs.append({"copy": copied - started, "keys_and_indexes": done - copied,
                         "seconds": done - started, "cpu": cpu.result})
        for name in [*table_names(bare), bare.checkpoints]:
            conn.execute(f"DROP TABLE IF EXISTS {name}")
    return {"rows": rows, **sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2],
            "runs": runs}
