"""The replay in bounded memory, against a real PostgreSQL: the runner's bulk path holds
the states of one page's tasks at most, the verification's task-by-task fold sums to
exactly what the fold in the log's order expects (first advance and later ones), and a
replay reports its peak memory."""

from __future__ import annotations

from typing import Any

import asyncpg

from projections.projector import BulkRows, ensure_checkpoint, load_by_task
from projections.replay import _create_for_load, _reachable, rebuild_tables, replay
from projections.verify import Fold, TaskFold, summarise
from shared.catalog import LIVE, Tables
from shared.position import ZERO
from tests.support import new_user
from tests.support.projection import Writer, catch_up, snapshot


def some_history(writer: Writer) -> list[str]:
    """Several users, every kind of event, tasks whose events are spread along the log."""
    writer.bulk(users=3, tasks_per_user=15)
    users = [new_user() for _ in range(2)]
    tasks = [writer.create(user, f"task {n}") for user in users for n in range(4)]
    for n, task in enumerate(tasks):
        user = users[n // 4]
        writer.change(user, task, title=f"task {n}, renamed")
        if n % 2:
            writer.change(user, task, completed=True)
        if n % 3 == 0:
            writer.delete(user, task)
    return users


class Watched(BulkRows):
    """The bulk sink, recording how many task states it holds once a page is written."""

    def __init__(self, writer: asyncpg.Connection) -> None:
        super().__init__(writer)
        self.most = 0
        self.pages = 0

    async def write(self, conn: asyncpg.Connection, t: Tables, rows: tuple[Any, ...]) -> None:
        await super().write(conn, t, rows)
        self.most = max(self.most, len(self.held))
        self.pages += 1


async def test_the_bulk_load_holds_one_task_between_pages_and_equals_the_live_tables(
    own_db: str,
) -> None:
    writer = Writer(own_db)
    try:
        some_history(writer)
    finally:
        writer.close()
    await catch_up(own_db)
    live = snapshot(own_db)
    target = rebuild_tables(LIVE, 1)
    conn, read, write = [await asyncpg.connect(own_db) for _ in range(3)]
    try:
        await _create_for_load(conn, target)
        await ensure_checkpoint(conn, target)
        sink = Watched(write)
        await load_by_task(read, conn, target, await _reachable(conn), sink, batch_size=7)
    finally:
        for c in (conn, read, write):
            await c.close()
    rebuilt = snapshot(own_db, target)
    assert sink.pages > 20  # pages of 7 events: most tasks span two
    assert sink.most == 1  # only the task a page ends in waits for the next page
    assert rebuilt == live


async def test_the_task_by_task_fold_expects_what_the_fold_in_log_order_does(
    own_db: str,
) -> None:
    writer = Writer(own_db)
    conn = await asyncpg.connect(own_db)
    try:
        users = some_history(writer)
        first = await _reachable(conn)
        by_task, in_order = TaskFold(), Fold(per_task=False)
        assert await by_task.advance(conn, first) == await in_order.advance(conn, first) > 100
        assert by_task.expected() == in_order.expected()
        assert by_task.touched == in_order.touched

        # Later events: changes of tasks folded already, deletions, a new task.
        task = writer.create(users[0], "late")
        old = writer.create(users[1], "older")
        middle = await _reachable(conn)
        writer.change(users[0], task, completed=True)
        writer.change(users[1], old, title="older, renamed")
        writer.delete(users[1], old)
        second = await _reachable(conn)
        for upto in (middle, second):
            by_task.touched.clear()
            in_order.touched.clear()
            assert await by_task.advance(conn, upto) == await in_order.advance(conn, upto)
            assert by_task.expected() == in_order.expected()
            assert by_task.touched == in_order.touched
            assert by_task.expected(users) == in_order.expected(users)
        assert by_task.problems == in_order.problems == []

        # And both are what the tables hold once projected.
        await catch_up(own_db)
        assert {u: s for u, s in by_task.expected().items() if s.history} == {
            u: s for u, s in (await summarise(conn, LIVE)).items()}
        assert await by_task.advance(conn, second) == 0
        assert by_task.position == second != ZERO
    finally:
        writer.close()
        await conn.close()


async def test_a_replay_reports_its_peak_memory_and_its_folds(own_db: str) -> None:
    writer = Writer(own_db)
    try:
        some_history(writer)
    finally:
        writer.close()
    await catch_up(own_db)
    result = await replay(own_db, batch_size=11)
    assert set(result.peak_rss_mb) == {"replay", "fold"}
    # Of this test process and of the fold process it started and ended.
    assert result.peak_rss_mb["replay"] > 10 and result.peak_rss_mb["fold"] > 10
    assert set(result.phases) == {"setup", "load", "index", "verify", "switch"}
