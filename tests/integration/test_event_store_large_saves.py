"""The library's writer (`shared.eventstore.TaskStore`, used by `taskctl db init`, the
tests' `Writer.bulk` and the benchmark's seeding) saves any amount at once, over a Unix
socket too.

psycopg 3.3.9 never finishes sending a pipelined statement larger than the socket takes at
once, and the library sends a save's events as one pipelined statement: over a Unix socket
(a send buffer of about 200 KB) a save of a few thousand events waited for ever. That
stopped `make test` against the embedded PostgreSQL, which listens on a Unix socket only.
`TaskRecorder.insert_events` sends saves past `PIPELINE_BYTES` without the pipeline.
These tests reach the test server through its Unix socket when it has one here (the
embedded server's URL is one already); a server elsewhere is reached as configured.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from shared.catalog import EVENTS_TABLE
from shared.events import Task
from shared.eventstore import PIPELINE_BYTES
from tests.support import PostgresServer, library_store, new_user, unix_socket_url
from tests.support.projection import fresh_database, settings_for

TIMEOUT = 60.0


@pytest.fixture
def socket_db(pg_server: PostgresServer) -> Iterator[str]:
    url = fresh_database(pg_server)
    yield unix_socket_url(url)
    pg_server.drop_database(url)


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call()`'s result, or a failure (not a hung test) if it takes longer."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(_outcome(call)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still running after {seconds:g}s"
    kind, value = out[0]
    if kind == "raised":
        raise value
    return value


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "returned", call()
    except BaseException as e:
        return "raised", e


def tasks(count: int, owner: str) -> list[Task]:
    stamp = {"actor": owner, "request_id": "large-save"}
    return [Task.create(owner=owner, title=f"task {n} " + "x" * 200, description=None, **stamp)
            for n in range(count)]


def stored(url: str, owner: str) -> tuple[int, int]:
    """(events, bytes of their state) of `owner`'s tasks in the store."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            f"SELECT count(*), coalesce(sum(octet_length(e.state)), 0) FROM {EVENTS_TABLE} e"
            f" JOIN {EVENTS_TABLE} c ON c.originator_id = e.originator_id"
            " AND c.originator_version = 1"
            " WHERE convert_from(c.state, 'UTF8')::jsonb ->> 'owner' = %s", (owner,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_a_save_of_megabytes_completes_and_every_event_reads_back(socket_db: str) -> None:
    store = library_store(settings_for(socket_db))
    owner = new_user()
    many = tasks(6_000, owner)  # about 3 MB of state: one statement
    try:
        recordings = within(TIMEOUT, lambda: store.save(*many))
        assert len(recordings) == len(many)
        ids = [r.notification.id for r in recordings]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        assert store.repository.get(many[-1].id).title == many[-1].title
    finally:
        store.close()
    events, size = stored(socket_db, owner)
    assert events == len(many)
    assert size > 1_000_000 > 10 * PIPELINE_BYTES  # the size that waited for ever before


def test_a_large_save_that_conflicts_stores_none_of_its_events(socket_db: str) -> None:
    store = library_store(settings_for(socket_db))
    owner = new_user()
    first = tasks(1, owner)[0]
    try:
        store.save(first)
        again = store.repository.get(first.id)
        first.change(title="one way", actor=owner, request_id="a")
        again.change(title="another", actor=owner, request_id="b")
        store.save(first)  # version 2 is taken: `again` conflicts
        batch = [*tasks(6_000, owner), again]
        with pytest.raises(IntegrityError):
            within(TIMEOUT, lambda: store.save(*batch))
    finally:
        store.close()
    assert stored(socket_db, owner)[0] == 2  # the first task's two events, none of the batch
