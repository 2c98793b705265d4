"""Every refusal has a reason: the answer stays one of the safe messages (401, or 503 when
the key set cannot be had), while the log line says why, with what was expected and the
setting that says so, at most one line per reason every LOG_EVERY seconds, and
auth_refusals_total{reason} counts each one. Against a key server in its own process."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from prometheus_client import REGISTRY

from shared import auth as auth_module
from shared.auth import EXPIRED, INVALID, MISSING, REASONS, UNAVAILABLE, Authenticator
from shared.errors import ApiError
from shared.settings import Settings
from tests.support import TEST_SECRET
from tests.support.keyserver import KeyServer
from tests.support.process import free_port
from tests.support.signing import SigningKey, claims, new_key

KEY = new_key()
OTHER = new_key()  # never published


@pytest.fixture(scope="module")
def key_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyServer]:
    server = KeyServer(tmp_path_factory.mktemp("keyserver"), free_port())
    server.set(keys=[KEY.jwk])
    server.start()
    yield server
    server.stop()


def settings_for(server: KeyServer, **extra: Any) -> Settings:
    base = server.base_url
    values: dict[str, Any] = {"environment": "test", "better_auth_url": base,
                              "jwt_issuer": base, "jwt_audience": base}
    return Settings(**(values | extra))


def good(key: SigningKey = KEY, **overrides: Any) -> dict[str, Any]:
    return claims(**overrides)


def b64(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def count(reason: str) -> float:
    return REGISTRY.get_sample_value("auth_refusals_total", {"reason": reason}) or 0.0


# (reason, the Authorization header, the message answered, what the log must say)
def cases(server: KeyServer) -> list[tuple[str, str | None, str, str]]:
    base = server.base_url
    ok = {"iss": base, "aud": base}
    past = int(time.time()) - 120
    return [
        ("missing_header", None, MISSING, "no Authorization header"),
        ("missing_header", "Basic dXNlcjpwYXNz", MISSING, "not Bearer"),
        ("too_large", f"Bearer {KEY.token(good(**ok, pad='x' * 17_000))}", INVALID,
         "over MAX_TOKEN_BYTES=16384"),
        ("malformed", "Bearer not-a-jwt", INVALID, "not a JWT"),
        ("algorithm", f"Bearer {jwt.encode(good(**ok), TEST_SECRET, 'HS256')}", INVALID,
         "BETTER_AUTH_SECRET is not set"),
        ("algorithm", f"Bearer {b64({'alg': 'none'})}.{b64(good(**ok))}.", INVALID,
         "alg 'none' is not allowed"),
        ("algorithm", "Bearer " + jwt.encode(good(**ok), new_key("ES256").private, "ES256",
                                             {"kid": KEY.kid}),
         INVALID, "the token says ES256"),
        ("unknown_kid", f"Bearer {OTHER.token(good(**ok))}", INVALID,
         f"kid {OTHER.kid!r} is not in the key set"),
        ("signature", "Bearer " + jwt.encode(good(**ok), OTHER.private, "EdDSA",
                                             {"kid": KEY.kid}),
         INVALID, "the signature does not verify"),
        ("expired", f"Bearer {KEY.token(good(**ok, exp=past, iat=past - 60))}", EXPIRED,
         "the token expired 12"),  # 120 s ago (121 when rounded up)
        ("not_yet_valid", f"Bearer {KEY.token(good(**ok, nbf=int(time.time()) + 600))}",
         INVALID, "valid only from"),
        ("issuer", f"Bearer {KEY.token(good(iss='http://localhost:3000', aud=base))}", INVALID,
         f"expected issuer {base!r} (JWT_ISSUER), got 'http://localhost:3000'"),
        ("issuer", f"Bearer {KEY.token(good(aud=base))}", INVALID, "no iss claim"),
        ("audience", f"Bearer {KEY.token(good(iss=base, aud='https://api.example.com'))}",
         INVALID, f"expected audience {base!r} (JWT_AUDIENCE)"),
        ("claims", f"Bearer {KEY.token({'exp': int(time.time()) + 60, **ok})}", INVALID,
         "no sub claim"),
        ("claims", f"Bearer {KEY.token(good(**ok, exp='tomorrow'))}", INVALID,
         "exp is 'tomorrow', not a number"),
        # Better Auth's session cookie cache, signed with the published key (its
        # jwt({sessionCookieCache: true})): refused before the audience is even looked at.
        ("token_type", "Bearer " + KEY.token(good(iss=base, aud="better-auth:session-cache"),
                                             typ="better-auth.session-cache+jwt"),
         INVALID, "Better Auth's session cookie cache"),
        ("token_type", f"Bearer {KEY.token(good(iss=base, aud=[base, 'better-auth:session-cache']))}",
         INVALID, "not an API token"),
    ]


CASE_IDS = ["no-header", "basic-scheme", "too-large", "not-a-jwt", "hs256-without-secret",
            "alg-none", "alg-not-the-keys", "unknown-kid", "bad-signature", "expired",
            "not-yet-valid", "wrong-issuer", "no-issuer", "wrong-audience", "no-sub",
            "text-exp", "session-cache-typ", "session-cache-aud"]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
async def test_each_refusal_is_answered_safely_logged_with_its_reason_and_counted(
    key_server: KeyServer, caplog: pytest.LogCaptureFixture, index: int
) -> None:
    reason, header, message, logged = cases(key_server)[index]
    authenticator = Authenticator(settings_for(key_server))  # a fresh log throttle
    caplog.set_level(logging.INFO, logger="taskservice.auth")
    before = count(reason)
    with pytest.raises(ApiError) as caught:
        await authenticator.user_id(header)
    assert (caught.value.status, caught.value.message) == (401, message)
    assert count(reason) == before + 1
    lines = [r for r in caplog.records if getattr(r, "reason", None) == reason]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert logged in lines[0].getMessage(), lines[0].getMessage()
    assert lines[0].auth_settings["jwks_url"] == key_server.jwks_url  # the settings used
    header_token = (header or "").partition(" ")[2]
    if len(header_token) > 40:
        assert header_token not in lines[0].getMessage()  # never the token itself


def test_the_cases_cover_every_reason_but_the_outage(key_server: KeyServer) -> None:
    covered = {reason for reason, *_ in cases(key_server)}
    # The outage below; the session reasons in test_auth_sessions.py.
    assert covered == set(REASONS) - {"keys_unavailable", "session", "session_unavailable"}
    assert len(cases(key_server)) == len(CASE_IDS)


async def test_no_key_set_is_a_503_logged_as_keys_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed = free_port()  # nothing listens there
    authenticator = Authenticator(Settings(environment="test",
                                           jwks_url=f"http://127.0.0.1:{closed}/api/auth/jwks"))
    caplog.set_level(logging.INFO, logger="taskservice.auth")
    before = count("keys_unavailable")
    with pytest.raises(ApiError) as caught:
        await authenticator.user_id(f"Bearer {KEY.token(claims())}")
    assert (caught.value.status, caught.value.message) == (503, UNAVAILABLE)
    assert caught.value.code == "SERVICE_UNAVAILABLE"
    assert int(caught.value.headers["Retry-After"]) >= 1
    assert count("keys_unavailable") == before + 1
    (line,) = [r for r in caplog.records if getattr(r, "reason", None) == "keys_unavailable"]
    assert "no key set fetched yet" in line.getMessage()
    assert "connection refused" in line.getMessage()


async def test_refusal_lines_are_rate_limited_per_reason_and_say_how_many_were_left_out(
    key_server: KeyServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth_module, "LOG_EVERY", 0.5)
    authenticator = Authenticator(settings_for(key_server))
    caplog.set_level(logging.INFO, logger="taskservice.auth")
    before = count("malformed")
    for _ in range(50):
        with pytest.raises(ApiError):
            await authenticator.user_id("Bearer garbage")
    with pytest.raises(ApiError):  # another reason has its own allowance
        await authenticator.user_id(f"Bearer {OTHER.token(claims())}")
    assert count("malformed") == before + 50  # every refusal is counted...
    lines = [r for r in caplog.records if getattr(r, "reason", None) == "malformed"]
    assert len(lines) == 1  # ... one is logged
    assert [r for r in caplog.records if getattr(r, "reason", None) == "unknown_kid"]
    time.sleep(0.55)
    with pytest.raises(ApiError):
        await authenticator.user_id("Bearer garbage")
    lines = [r for r in caplog.records if getattr(r, "reason", None) == "malformed"]
    assert len(lines) == 2
    assert "49 more refusals for this reason" in lines[1].getMessage()
    assert lines[1].left_out == 49


async def test_the_start_up_log_says_what_better_auth_puts_in_iss_and_aud(
    key_server: KeyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="taskservice.auth")
    authenticator = Authenticator(Settings(environment="test",
                                           better_auth_url=key_server.base_url + "/"))
    await authenticator.start()
    await authenticator.close()
    (line,) = [r.getMessage() for r in caplog.records if "JWT_ISSUER" in r.getMessage()]
    base = key_server.base_url
    assert "JWT_ISSUER and JWT_AUDIENCE not set" in line
    assert f"set JWT_ISSUER={base} and JWT_AUDIENCE={base}" in line


async def test_a_token_refused_once_is_refused_again_not_remembered(
    key_server: KeyServer,
) -> None:
    authenticator = Authenticator(settings_for(key_server))
    token = KEY.token(good(iss="http://elsewhere.example", aud=key_server.base_url))
    for _ in range(2):
        with pytest.raises(ApiError) as caught:
            await authenticator.user_id(f"Bearer {token}")
        assert caught.value.status == 401
