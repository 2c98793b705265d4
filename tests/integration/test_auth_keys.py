"""The key set under failure, through the real command API and a key server in its own
process (tests.support.keyserver, stopped for an outage and started again on the same
port): an outage is a 503 (with Retry-After), never a 401, and the service recovers
within a few seconds of the key server's return; a new kid is accepted within a few
seconds; a flood of random kids costs at most one fetch per JWKS_REFETCH_INTERVAL; a
key server that trickles its answer is cut off at JWKS_FETCH_TIMEOUT."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from command_api.app import create_app
from shared.settings import Settings
from tests.support.keyserver import KeyServer
from tests.support.process import free_port
from tests.support.signing import auth, claims, new_key

DEFAULT_INTERVAL = Settings.model_fields["jwks_refetch_interval"].default
SLACK = 1.5  # seconds a loaded test machine may add to a bound


@pytest.fixture
def key_server(tmp_path: Path) -> Iterator[KeyServer]:
    server = KeyServer(tmp_path / "keyserver", free_port())
    yield server
    server.stop()


@pytest.fixture
def make_client(database_url: str) -> Iterator[Callable[..., TestClient]]:
    with ExitStack() as stack:

        def make(**auth_settings: Any) -> TestClient:
            settings = Settings(environment="test", database_url=database_url, **auth_settings)
            app = create_app(settings)
            return stack.enter_context(TestClient(app, raise_server_exceptions=False))

        yield make


def create(client: TestClient, token: str) -> Any:
    return client.post("/api/tasks", json={"title": "Buy milk"}, headers=auth(token))


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert int(response.headers["retry-after"]) >= 1
    assert "www-authenticate" not in response.headers  # not a sign-out


def until_created(client: TestClient, token: str, within: float) -> float:
    """Seconds until a request with `token` is accepted (polling), at most `within`."""
    started = time.monotonic()
    while True:
        response = create(client, token)
        if response.status_code == 201:
            return time.monotonic() - started
        assert response.status_code in (401, 503), response.text
        assert time.monotonic() - started < within, f"still {response.status_code}: {response.text}"
        time.sleep(0.1)


def wait_for_fetches(server: KeyServer, count: int, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while server.requests < count:
        assert time.monotonic() < deadline, f"{server.requests} fetches, not {count}"
        time.sleep(0.02)


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("auth_refusals_total", {"reason": reason}) or 0.0


def stranger_token() -> str:
    """Signed under a kid nobody publishes (a random one, as a flood would send)."""
    return new_key().token(claims(), kid=uuid.uuid4().hex)


# -- an outage -------------------------------------------------------------------------


def test_an_outage_at_start_is_a_503_and_the_return_is_seen_within_seconds(
    key_server: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    key = new_key()
    key_server.set(keys=[key.jwk])  # not started: the key server is down
    client = make_client(jwks_url=key_server.jwks_url)  # the default interval
    token = key.token(claims())

    before = refusals("keys_unavailable")
    for _ in range(3):
        assert_unavailable(create(client, token))
    assert refusals("keys_unavailable") == before + 3
    ready = client.get("/api/ready")
    assert ready.status_code == 503, ready.text
    assert "no key set fetched yet" in ready.json()["error"]["details"]["auth"]

    key_server.start()
    took = until_created(client, token, within=DEFAULT_INTERVAL + SLACK)
    assert took <= DEFAULT_INTERVAL + SLACK
    ready = client.get("/api/ready")
    assert ready.status_code == 200 and ready.json()["data"]["auth"] == "ok"


def test_an_outage_mid_run_keeps_the_known_keys_and_503s_what_it_cannot_check(
    key_server: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    known, rotated = new_key(), new_key("ES256")
    key_server.set(keys=[known.jwk])
    key_server.start()
    client = make_client(jwks_url=key_server.jwks_url)
    assert create(client, known.token(claims())).status_code == 201

    key_server.stop()  # Better Auth goes down
    assert create(client, known.token(claims())).status_code == 201  # last good keys
    assert_unavailable(create(client, rotated.token(claims())))  # cannot be checked
    assert client.get("/api/ready").status_code == 200  # it can serve the known keys

    key_server.publish(rotated.jwk)  # it comes back with a new key
    key_server.start()
    took = until_created(client, rotated.token(claims()), within=DEFAULT_INTERVAL + SLACK)
    assert took <= DEFAULT_INTERVAL + SLACK
    assert create(client, known.token(claims())).status_code == 201


def test_a_key_server_answering_errors_is_an_outage_too(
    key_server: KeyServer, make_client: Callable[..., TestClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = new_key()
    key_server.set(keys=[key.jwk], status=502)
    key_server.start()
    caplog.set_level(logging.WARNING, logger="taskservice.auth")
    client = make_client(jwks_url=key_server.jwks_url, jwks_refetch_interval=0.5)
    assert_unavailable(create(client, key.token(claims())))
    assert any("HTTP 502 from the key server" in r.getMessage() for r in caplog.records)

    key_server.set(status=200)
    assert until_created(client, key.token(claims()), within=0.5 + SLACK) <= 0.5 + SLACK


# -- new keys and floods of unknown ones ------------------------------------------------


def test_a_new_kid_is_accepted_within_seconds_even_right_after_a_fetch(
    key_server: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    old = new_key()
    key_server.set(keys=[old.jwk])
    key_server.start()
    client = make_client(jwks_url=key_server.jwks_url)  # the default interval
    assert create(client, old.token(claims())).status_code == 201
    assert create(client, stranger_token()).status_code == 401  # a fetch, just now
    fetched = key_server.requests

    rotated = new_key()
    key_server.publish(rotated.jwk)  # Better Auth rotates: its next token has a new kid
    started = time.monotonic()
    response = create(client, rotated.token(claims()))
    took = time.monotonic() - started
    assert response.status_code == 201, response.text  # the first request, not a retry
    assert took <= DEFAULT_INTERVAL + SLACK
    assert key_server.requests == fetched + 1


def test_a_flood_of_random_kids_costs_one_fetch_per_interval(
    key_server: KeyServer, make_client: Callable[..., TestClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    interval = 0.5
    key = new_key()
    key_server.set(keys=[key.jwk])
    key_server.start()
    caplog.set_level(logging.WARNING, logger="taskservice.auth")
    client = make_client(jwks_url=key_server.jwks_url, jwks_refetch_interval=interval)
    wait_for_fetches(key_server, 1)
    before, counted = key_server.requests, refusals("unknown_kid")

    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: create(client, stranger_token()).status_code,
                                 range(100)))
    elapsed = time.monotonic() - started
    fetches = key_server.requests - before
    assert statuses == [401] * 100
    # The bound: one fetch per interval (and the one a wait may end on).
    assert 1 <= fetches <= elapsed / interval + 1, (fetches, elapsed)
    assert refusals("unknown_kid") == counted + 100
    lines = [r for r in caplog.records if getattr(r, "reason", None) == "unknown_kid"]
    assert 1 <= len(lines) <= elapsed / 10 + 1  # rate-limited: one per LOG_EVERY
    assert "is not in the key set" in lines[0].getMessage()
    assert create(client, key.token(claims())).status_code == 201  # real users unharmed


# -- a key server that trickles -------------------------------------------------------


@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
def test_a_trickling_key_server_is_cut_off_at_the_fetch_deadline(
    key_server: KeyServer, make_client: Callable[..., TestClient], headers: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    deadline = 1.0
    key = new_key()
    # A byte every 0.1 s: no socket read ever waits long, the whole never ends.
    key_server.set(keys=[key.jwk], trickle=0.1, trickle_headers=headers)
    key_server.start()
    caplog.set_level(logging.WARNING, logger="taskservice.auth")
    started = time.monotonic()
    client = make_client(jwks_url=key_server.jwks_url, jwks_fetch_timeout=deadline,
                         jwks_refetch_interval=0.5)
    assert_unavailable(create(client, key.token(claims())))
    assert time.monotonic() - started <= deadline + SLACK
    assert any("no complete answer within 1 s (JWKS_FETCH_TIMEOUT)" in r.getMessage()
               for r in caplog.records)
    assert client.get("/api/ready").status_code == 503

    key_server.set(trickle=None)  # a fetch under way may still trickle: one deadline more
    until_created(client, key.token(claims()), within=deadline + 0.5 + SLACK)
    assert client.get("/api/ready").status_code == 200


# -- every algorithm Better Auth offers ----------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "ES512", "RS256", "PS256"])
def test_every_key_type_better_auth_offers_verifies(
    key_server: KeyServer, make_client: Callable[..., TestClient], alg: str
) -> None:
    key = new_key(alg)
    key_server.set(keys=[key.jwk])
    key_server.start()
    client = make_client(jwks_url=key_server.jwks_url)
    response = create(client, key.token(claims()))
    assert response.status_code == 201, response.text


def test_an_es512_token_on_another_curve_is_refused(
    key_server: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    p521 = new_key("ES512")
    p256 = new_key("ES256")
    key_server.set(keys=[p521.jwk])
    key_server.start()
    client = make_client(jwks_url=key_server.jwks_url)
    # ES256 under the P-521 key's kid: the algorithm is the key's, never the header's.
    forged = jwt.encode(claims(), p256.private, "ES256", {"kid": p521.kid})
    assert create(client, forged).status_code == 401
