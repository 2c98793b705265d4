"""AUTH_SESSION_TOKENS: a bearer token that is no JWT (Better Auth's session token, from
its bearer() plugin) is checked with get-session, through the real command API, against
a stub of get-session in its own process (tests.support.keyserver): one call per new
token, the answer kept for AUTH_SESSION_CACHE_SECONDS and never past the session's end,
an outage a 503 and not a 401, "only" fetching no key set. Better Auth itself:
tests/e2e/test_better_auth_guide.py."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from command_api.app import create_app
from shared.auth import Authenticator
from shared.errors import ApiError
from shared.settings import Settings
from taskctl.authcheck import check
from tests.support import new_user
from tests.support.keyserver import SESSION_PATH, KeyServer
from tests.support.process import free_port
from tests.support.signing import auth, claims, new_key

KEY = new_key()


@pytest.fixture
def better_auth(tmp_path: Path) -> Iterator[KeyServer]:
    server = KeyServer(tmp_path / "better-auth", free_port())
    server.set(keys=[KEY.jwk], sessions={})
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_client(database_url: str) -> Iterator[Callable[..., TestClient]]:
    with ExitStack() as stack:

        def make(**values: Any) -> TestClient:
            settings = Settings(environment="test", database_url=database_url, **values)
            return stack.enter_context(TestClient(create_app(settings),
                                                  raise_server_exceptions=False))

        yield make


def session_token() -> str:
    """The shape of Better Auth's: a 32-character token, a dot, its signature."""
    return f"{secrets.token_urlsafe(24)}.{secrets.token_urlsafe(32)}"


def sign_in(server: KeyServer, user: str, *, ends_in: float = 3600) -> str:
    token = session_token()
    end = datetime.fromtimestamp(time.time() + ends_in, UTC).isoformat().replace("+00:00", "Z")
    sessions = dict(server._state.get("sessions", {}))
    sessions[token] = {"session": {"token": token.split(".")[0], "userId": user,
                                   "expiresAt": end}, "user": {"id": user, "name": "A"}}
    server.set(sessions=sessions)
    return token


def sign_out(server: KeyServer, token: str) -> None:
    server.set(sessions={t: s for t, s in server._state["sessions"].items() if t != token})


def calls(server: KeyServer) -> int:
    return sum(1 for path in server.paths() if path.startswith(SESSION_PATH))


def create(client: TestClient, token: str) -> Any:
    return client.post("/api/tasks", json={"title": "Session"}, headers=auth(token))


def refusals(reason: str) -> float:
    return REGISTRY.get_sample_value("auth_refusals_total", {"reason": reason}) or 0.0


def test_a_session_token_acts_as_its_user_beside_jwts_with_one_call_per_token(
    better_auth: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(better_auth_url=better_auth.base_url, auth_session_tokens="also")
    user = new_user()
    token = sign_in(better_auth, user)
    for _ in range(3):
        created = create(client, token)
        assert created.status_code == 201, created.text
        assert created.json()["data"]["user_id"] == user
    assert calls(better_auth) == 1  # kept for AUTH_SESSION_CACHE_SECONDS
    assert (better_auth.paths()[-1]).endswith("?disableRefresh=true")  # a read, no refresh
    assert create(client, KEY.token(claims())).status_code == 201  # JWTs as before
    assert calls(better_auth) == 1


def test_an_unknown_session_token_is_a_401_with_its_reason(
    better_auth: KeyServer, make_client: Callable[..., TestClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = make_client(better_auth_url=better_auth.base_url, auth_session_tokens="also")
    caplog.set_level(logging.INFO, logger="taskservice.auth")
    before = refusals("session")
    response = create(client, session_token())
    assert response.status_code == 401 and response.json()["detail"] == "Invalid token"
    assert refusals("session") == before + 1
    (line,) = [r for r in caplog.records if getattr(r, "reason", None) == "session"]
    assert "get-session knows no session for this token" in line.getMessage()


def test_a_signed_out_session_is_refused_once_its_answer_ages_out(
    better_auth: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(better_auth_url=better_auth.base_url, auth_session_tokens="also",
                         auth_session_cache_seconds=0.5)
    token = sign_in(better_auth, new_user())
    assert create(client, token).status_code == 201
    sign_out(better_auth, token)
    assert create(client, token).status_code == 201  # the kept answer: the trade-off
    time.sleep(0.6)
    assert create(client, token).status_code == 401
    assert calls(better_auth) == 2


def test_the_answer_is_never_kept_past_the_sessions_end(
    better_auth: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(better_auth_url=better_auth.base_url, auth_session_tokens="also",
                         auth_session_cache_seconds=600)
    token = sign_in(better_auth, new_user(), ends_in=1.0)
    assert create(client, token).status_code == 201
    time.sleep(1.2)
    refused = create(client, token)  # asked again (the session's end), and it has ended
    assert refused.status_code == 401 and refused.json()["detail"] == "Token expired"
    assert calls(better_auth) == 2


def test_get_session_down_is_a_503_and_its_return_is_seen_at_once(
    better_auth: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(better_auth_url=better_auth.base_url, auth_session_tokens="also")
    token = sign_in(better_auth, new_user())
    better_auth.stop()
    before = refusals("session_unavailable")
    response = create(client, token)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert int(response.headers["retry-after"]) >= 1
    assert refusals("session_unavailable") == before + 1
    better_auth.start()
    assert create(client, token).status_code == 201  # an outage is not remembered
    better_auth.set(session_status=500)
    assert create(client, session_token()).status_code == 503  # answering errors: too


async def test_concurrent_requests_with_one_new_token_share_one_call(
    better_auth: KeyServer,
) -> None:
    authenticator = Authenticator(Settings(environment="test", better_auth_url=better_auth.base_url,
                                           auth_session_tokens="only"))
    user = new_user()
    token = sign_in(better_auth, user)
    found = await asyncio.gather(*(authenticator.user_id(f"Bearer {token}") for _ in range(20)))
    assert found == [user] * 20
    assert calls(better_auth) == 1


def test_only_fetches_no_key_set_and_is_ready_without_one(
    better_auth: KeyServer, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(better_auth_url=better_auth.base_url, auth_session_tokens="only")
    assert client.get("/api/ready").status_code == 200
    token = sign_in(better_auth, new_user())
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: create(client, token).status_code, range(8)))
    assert statuses == [201] * 8
    assert all(path.startswith(SESSION_PATH) for path in better_auth.paths())


def test_without_the_setting_a_session_token_is_refused_with_a_hint(
    better_auth: KeyServer, make_client: Callable[..., TestClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = make_client(better_auth_url=better_auth.base_url)
    caplog.set_level(logging.INFO, logger="taskservice.auth")
    assert create(client, sign_in(better_auth, new_user())).status_code == 401
    (line,) = [r for r in caplog.records if getattr(r, "reason", None) == "malformed"]
    assert "looks like a Better Auth session token" in line.getMessage()
    assert "AUTH_SESSION_TOKENS" in line.getMessage()
    assert calls(better_auth) == 0


def test_the_setting_needs_better_auth_url() -> None:
    from shared.settings import SettingsError

    with pytest.raises(SettingsError, match="AUTH_SESSION_TOKENS=only needs BETTER_AUTH_URL"):
        Settings.from_env({"ENVIRONMENT": "test", "JWKS_URL": "http://127.0.0.1:1/jwks",
                           "AUTH_SESSION_TOKENS": "only"})


async def test_auth_check_shows_the_session_step(better_auth: KeyServer) -> None:
    settings = Settings(environment="test", better_auth_url=better_auth.base_url,
                        auth_session_tokens="also")
    user = new_user()
    lines: list[str] = []
    assert await check(settings, sign_in(better_auth, user), out=lines.append) == 0
    out = "\n".join(lines)
    assert "session tokens (AUTH_SESSION_TOKENS=also): checked with" in out
    assert "ok    format: not a JWT: a session token" in out
    assert f"ok    session: user {user!r}; the session ends" in out
    lines.clear()
    assert await check(settings, session_token(), out=lines.append) == 1
    assert lines[-1] == "refused (session): the APIs answer 401 'Invalid token'"


async def test_a_refused_session_is_answered_without_leaking_why(better_auth: KeyServer) -> None:
    authenticator = Authenticator(Settings(environment="test", better_auth_url=better_auth.base_url,
                                           auth_session_tokens="only"))
    with pytest.raises(ApiError) as caught:
        await authenticator.user_id(f"Bearer {session_token()}")
    assert (caught.value.status, caught.value.message) == (401, "Invalid token")
