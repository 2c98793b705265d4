"""With a synchronous standby, no answer acknowledges a write the standby lacks.

The hole (found by the failover drill's author): a keyed create whose commit is still
waiting for the standby when the command API gives up on it (DB_STATEMENT_TIMEOUT) is a
503, but once that wait is cancelled PostgreSQL keeps the commit locally. Its retry found the key and answered 201,
for a write that a failover right then would lose. Now a found key is touched first, so
the retry's answer waits for the standby like any write."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from command_api.app import create_app
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.support import TEST_SECRET, bearer, new_user
from tests.support.replica import Cluster, ReplicaSet


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


def committed_on(cluster: Cluster, database: str, user: str, key: str) -> int:
    (count,), = cluster.execute(
        "SELECT count(*) FROM command_idempotency WHERE user_id = %s AND key = %s",
        (user, key), database=database)
    return int(count)


def test_a_keyed_retry_is_not_acknowledged_before_the_standby_has_the_write(pair: ReplicaSet):
    settings = Settings(environment="test", database_url=pair.primary_url(),
                        better_auth_secret=TEST_SECRET, db_statement_timeout=0.5)
    user = new_user()
    body = {"title": "kept only if the standby has it"}
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.post("/api/tasks", json={"title": "warm"}, headers=bearer(user)).status_code == 201
        sender = walsender_pid(pair)
        os.kill(sender, signal.SIGSTOP)  # the standby gets nothing more
        try:
            # A first try that times out in its commit's wait for the standby: a 503.
            # Its backend still waits; a cancel (asyncpg's own, when it lands before the
            # connection is dropped, or an operator's) ends the wait, and PostgreSQL
            # keeps the commit on the primary alone ("already committed locally").
            key = "sync-1"
            keyed = {**bearer(user), "Idempotency-Key": key}
            first = client.post("/api/tasks", json=body, headers=keyed)
            assert first.status_code == 503, first.text
            deadline = time.monotonic() + 10
            while committed_on(pair.primary, pair.database, user, key) == 0:
                assert time.monotonic() < deadline, "the first try's commit never showed"
                pair.primary.execute(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity"
                    " WHERE wait_event = 'SyncRep'", database=pair.database)
                time.sleep(0.05)
            retried = client.post("/api/tasks", json=body, headers=keyed)
            assert retried.status_code == 503, retried.text  # was: 201
        finally:
            os.kill(sender, signal.SIGCONT)
        settled = client.post("/api/tasks", json=body, headers=keyed)
        assert settled.status_code == 201, settled.text
    pair.wait_replayed()
    assert committed_on(pair.replica, pair.database, user, key) == 1
