"""The live stream across several query-API replicas, and on a replica database.

- Two query APIs on one database (two replicas behind a gateway): a client that drops
  from one resumes on the other from its last id with no gap and no duplicate, and a
  ticket one issued is good on the other (the key comes from the shared
  BETTER_AUTH_SECRET), once on each process that redeems it.
- A query API reading a real streaming replica (`tests/support/replica.py`, replaying
  every commit 300 ms late): a hot standby delivers no NOTIFY, so the stream hub waits
  on the position watch's timer; changes still arrive, in order. A client that saw
  changes from a query API on the primary and reconnects to the lagging replica gets
  nothing twice: the position it names is a floor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from command_api.app import create_app as create_command_app
from query_api.app import create_app as create_query_app
from shared.settings import Settings
from taskctl.dbinit import init_database
from tests.integration.test_stream import caught_up, projector, stream, ticket_for
from tests.support import TEST_SECRET, new_user
from tests.support.live import serve
from tests.support.query import create
from tests.support.replica import ReplicaSet


@pytest.fixture(scope="module")
def live_projector(database_url: str) -> Iterator[None]:
    with projector(database_url):
        yield


def test_a_client_resumes_on_another_replica_with_no_gap_and_no_duplicate(
    command_client: TestClient, settings: Settings, live_projector: None
):
    user = new_user()
    with serve(create_query_app(settings)) as one, serve(create_query_app(settings)) as two:
        written = [create(command_client, user, f"one {i}")[1] for i in range(3)]
        caught_up(one, user)  # else the stream, starting now, would get them as they come
        with stream(one, user) as sse:
            assert sse.next().event == "ready"
            written += [create(command_client, user, f"live {i}")[1] for i in range(3)]
            seen = [e.id for e in sse.take(3)]
        assert seen == written[3:]
        written += [create(command_client, user, f"between {i}")[1] for i in range(3)]
        with stream(two, user, last_event_id=seen[-1]) as sse:
            written += [create(command_client, user, f"two {i}")[1] for i in range(3)]
            seen += [e.id for e in sse.take(6)]
            assert sse.quiet(0.5) == []
        assert seen == written[3:]

        # A ticket from one replica is good on the other, once per process.
        ticket = ticket_for(one, user)["ticket"]
        with stream(two, None, ticket=ticket) as sse:
            assert sse.status == 200 and sse.next().event == "ready"
        with stream(two, None, ticket=ticket) as sse:
            assert sse.status == 401


APPLY_DELAY_MS = 300


@pytest.fixture(scope="module")
def pair() -> Iterator[ReplicaSet]:
    with ReplicaSet() as rs:
        init_database(Settings(environment="test", database_url=rs.primary_url(),
                               better_auth_secret=TEST_SECRET))
        rs.wait_replayed()
        rs.set_apply_delay(APPLY_DELAY_MS)
        yield rs


def test_on_a_replica_database_the_stream_follows_the_timer_and_never_repeats(
    pair: ReplicaSet,
):
    primary = Settings(environment="test", database_url=pair.primary_url(),
                       better_auth_secret=TEST_SECRET)
    on_replica = primary.model_copy(update={"read_database_url": pair.replica_url()})
    user = new_user()
    with TestClient(create_command_app(primary)) as commands, projector(pair.primary_url()), \
            serve(create_query_app(primary)) as on_primary, \
            serve(create_query_app(on_replica)) as replica_api:
        with stream(replica_api, user) as sse:
            assert sse.next().event == "ready"
            written = []
            for i in range(3):
                started = time.monotonic()
                written.append(create(commands, user, f"replicated {i}")[1])
                (event,) = sse.take(1, timeout=10)
                assert event.id == written[-1]
                # The replica's 300 ms, then at most the watch's 1 s timer (and a batch).
                assert APPLY_DELAY_MS / 1000 <= time.monotonic() - started < 3
        ready = httpx.get(f"{replica_api}/api/ready", timeout=10).json()["data"]
        assert ready["listening"] is False  # a hot standby: no LISTEN, the timer path

        # Seen on the primary at once; then reconnecting to the replica, still behind.
        with stream(on_primary, user) as sse:
            assert sse.next().event == "ready"
            written.append(create(commands, user, "fresh")[1])
            (event,) = sse.take(1)
            assert event.id == written[-1]
        with stream(replica_api, user, last_event_id=written[-1]) as sse:
            ready_event = sse.next(5)
            assert ready_event.event == "ready" and ready_event.id == written[-1]
            written.append(create(commands, user, "next")[1])
            (event,) = sse.take(1, timeout=10)
            assert event.id == written[-1]  # "fresh" did not come again
            assert sse.quiet(1.5) == []
