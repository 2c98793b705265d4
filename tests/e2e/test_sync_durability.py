"""With a synchronous standby, no answer acknowledges a write the standby lacks.

The hole (found by the failover drill's author): a keyed create whose commit is still
waiting for the standby when the command API gives up on it (DB_STATEMENT_TIMEOUT) is a
503, but PostgreSQL keeps the commit locally. Its retry found the key and answered 201,
for a write that a failover right then would lose. Now a found key is touched first, so
the retry's answer waits for the standby like any write."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from command_api.app import create_app
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.replica import ReplicaSet


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicaSet]:
    with ReplicaSet(synchronous=True) as rs:
        init_database(Settings(environment="test", database_url=rs.primary_url(),
                               better_auth_secret=TEST_SECRET))
        rs.wait_replayed()
        yield rs


def walsender_pid(pair: ReplicaSet) -> int:
    (pid,), = pair.primary.execute(
        "SELECT pid FROM pg_stat_replication WHERE application_name = 'replica'")
    return int(pid)


def test_a_keyed_retry_is_not_acknowledged_before_the_standby_has_the_write(pair: ReplicaSet):
    settings = Settings(environment="test", database_url=pair.primary_url(),
                        better_auth_secret=TEST_SECRET, db_statement_timeout=0.5)
    user = new_user()
    keyed = {**bearer(user), "Idempotency-Key": "sync-1"}
    body = {"title": "kept only if the standby has it"}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.post("/api/tasks", json={"title": "warm"}, headers=bearer(user)).status_code == 201
        sender = walsender_pid(pair)
        os.kill(sender, signal.SIGSTOP)  # the standby gets nothing more
        try:
            first = client.post("/api/tasks", json=body, headers=keyed)
            assert first.status_code == 503, first.text  # it timed out waiting
            # Committed locally all the same:
            (count,), = pair.primary.execute(
                "SELECT count(*) FROM command_idempotency WHERE user_id = %s AND key = 'sync-1'",
                (user,), database=pair.database)
            assert count == 1
            retried = client.post("/api/tasks", json=body, headers=keyed)
            assert retried.status_code == 503, retried.text  # was: 201
        finally:
            os.kill(sender, signal.SIGCONT)
        settled = client.post("/api/tasks", json=body, headers=keyed)
        assert settled.status_code == 201, settled.text
    pair.wait_replayed()
    (on_standby,), = pair.replica.execute(
        "SELECT count(*) FROM command_idempotency WHERE user_id = %s AND key = 'sync-1'",
        (user,), database=pair.database)
    assert on_standby == 1
