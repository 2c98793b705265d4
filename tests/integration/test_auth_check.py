"""`taskctl auth check [--token T]`: the settings, the key server's state and each
verification step, against a key server in its own process; its exit status says
whether the APIs would accept the token. Most cases run `taskctl.authcheck.check` in
this process; the real command runs for a good token, a refused one and an outage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from shared.settings import Settings
from taskctl.authcheck import check
from tests.support import TEST_SECRET
from tests.support.keyserver import KeyServer
from tests.support.process import ROOT, free_port
from tests.support.signing import claims, new_key

KEY = new_key()
RSA = new_key("RS256")
STRANGER = new_key()


@pytest.fixture(scope="module")
def key_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyServer]:
    server = KeyServer(tmp_path_factory.mktemp("keyserver"), free_port())
    server.set(keys=[KEY.jwk, RSA.jwk, {"kty": "EC", "crv": "P-384", "kid": "p384",
                                        "x": "AA", "y": "AA"}])
    server.start()
    yield server
    server.stop()


def strict(server: KeyServer, **extra: Any) -> Settings:
    base = server.base_url
    return Settings(**({"environment": "test", "better_auth_url": base, "jwt_issuer": base,
                        "jwt_audience": base} | extra))


async def run(settings: Settings, token: str | None) -> tuple[int, str]:
    lines: list[str] = []
    status = await check(settings, token, out=lines.append)
    return status, "\n".join(lines)


def ok_claims(server: KeyServer, **extra: Any) -> dict[str, Any]:
    return claims(iss=server.base_url, aud=server.base_url, **extra)


async def test_a_good_token_passes_every_step_and_exits_0(key_server: KeyServer) -> None:
    token = KEY.token(ok_claims(key_server, sub="user-7"))
    status, out = await run(strict(key_server), token)
    assert status == 0, out
    base = key_server.base_url
    for expected in (
        "mode: JWKS (Better Auth's jwt() plugin keys)",
        f"key set: {base}/api/auth/jwks (from BETTER_AUTH_URL)",
        "HS256: off (BETTER_AUTH_SECRET is unset)",
        f"issuer (JWT_ISSUER): {base!r}",
        f"audience (JWT_AUDIENCE): {base!r}",
        "usable key(s)",
        f"kid {KEY.kid!r}: OKP Ed25519, verifies EdDSA",
        f"kid {RSA.kid!r}: RSA 2048, verifies RS256",  # its declared alg
        "skipped kid 'p384': EC P-384 key; this service verifies",
        "ok    signature: verifies",
        f"ok    issuer: {base!r} (JWT_ISSUER)",
        "ok    subject: user 'user-7'",
        "accepted: the APIs act as user 'user-7'",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    assert "answers in " in out and " ms" in out
    assert "FAIL" not in out


def failures(server: KeyServer) -> list[Any]:
    base = server.base_url
    past = int(time.time()) - 600
    return [
        pytest.param(KEY.token(claims(iss="http://localhost:3000", aud=base)), "issuer",
                     f"expected issuer {base!r} (JWT_ISSUER), got 'http://localhost:3000'",
                     id="issuer"),
        pytest.param(KEY.token(claims(iss=base, aud="other")), "audience",
                     "expected audience", id="audience"),
        pytest.param(KEY.token(ok_claims(server, exp=past, iat=past - 60)), "expired",
                     "the token expired", id="expired"),
        pytest.param(STRANGER.token(ok_claims(server)), "unknown_kid",
                     f"kid {STRANGER.kid!r} is not in the key set", id="unknown-kid"),
        pytest.param(jwt.encode(ok_claims(server), STRANGER.private, "EdDSA", {"kid": KEY.kid}),
                     "signature", "the signature does not verify", id="signature"),
        pytest.param(jwt.encode(ok_claims(server), TEST_SECRET, "HS256"), "algorithm",
                     "BETTER_AUTH_SECRET is not set", id="hs256-off"),
        pytest.param(KEY.token(ok_claims(server, pad="x" * 17_000)), "too_large",
                     "over MAX_TOKEN_BYTES=16384", id="too-large"),
        pytest.param("not.a.jwt", "malformed", "not a JWT", id="malformed"),
        pytest.param(KEY.token({"exp": int(time.time()) + 60, "iss": base, "aud": base}),
                     "claims", "no sub claim", id="no-sub"),
        pytest.param(KEY.token(ok_claims(server, nbf=int(time.time()) + 900)), "not_yet_valid",
                     "valid only from", id="not-yet-valid"),
    ]


@pytest.mark.parametrize("index", range(10), ids=[
    "issuer", "audience", "expired", "unknown-kid", "signature", "hs256-off", "too-large",
    "malformed", "no-sub", "not-yet-valid"])
async def test_each_failure_names_its_step_and_exits_1(
    key_server: KeyServer, index: int
) -> None:
    param = failures(key_server)[index]
    token, reason, detail = param.values
    status, out = await run(strict(key_server), token)
    assert status == 1, out
    fail_lines = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert fail_lines == [f"  FAIL  {reason}: " + fail_lines[0].split(": ", 1)[1]], out
    assert detail in fail_lines[0], out
    answer = "401 'Token expired'" if reason == "expired" else "401 'Invalid token'"
    assert out.splitlines()[-1] == f"refused ({reason}): the APIs answer {answer}", out


async def test_bearer_prefix_is_accepted_and_the_steps_before_the_failure_are_ok(
    key_server: KeyServer,
) -> None:
    token = KEY.token(claims(iss=key_server.base_url, aud="someone-else"))
    status, out = await run(strict(key_server), f"Bearer {token}")
    assert status == 1
    steps = [line.split(":")[0].split() for line in out.splitlines()
             if line.startswith("  ok ") or line.startswith("  FAIL")]
    assert steps == [["ok", "size"], ["ok", "format"], ["ok", "algorithm"], ["ok", "key"],
                     ["ok", "signature"], ["ok", "expiry"], ["ok", "issuer"],
                     ["FAIL", "audience"]]


async def test_without_a_token_it_checks_the_key_server_only(key_server: KeyServer) -> None:
    status, out = await run(strict(key_server), None)
    assert status == 0, out
    assert "token" not in out.splitlines()
    assert "answers in" in out


async def test_unset_issuer_and_audience_say_what_better_auth_puts_there(
    key_server: KeyServer,
) -> None:
    base = key_server.base_url
    status, out = await run(Settings(environment="test", better_auth_url=base + "/"), None)
    assert status == 0
    assert f"issuer (JWT_ISSUER): not checked (unset); Better Auth puts {base!r} there" in out
    assert f"set JWT_ISSUER={base} and JWT_AUDIENCE={base}" in out


async def test_hs256_mode_checks_without_a_key_server() -> None:
    token = jwt.encode(claims(sub="dev-user"), TEST_SECRET, "HS256")
    status, out = await run(Settings(environment="test", better_auth_secret=TEST_SECRET), token)
    assert status == 0, out
    assert "mode: HS256 with BETTER_AUTH_SECRET" in out
    assert "key set: none" in out and "key server" not in out
    assert "ok    algorithm: HS256 with BETTER_AUTH_SECRET" in out


# -- the real command ------------------------------------------------------------------


def taskctl(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "JWKS_URL", "JWT_ISSUER",
                          "JWT_AUDIENCE", "DATABASE_URL")}
    return subprocess.run([sys.executable, "-m", "taskctl.cli", "auth", "check", *args],
                          cwd=ROOT, env={**clean, "TASKCTL_DATA_DIR": "/nonexistent", **env},
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_the_command_exits_0_for_a_good_token_and_1_for_a_refused_one(
    key_server: KeyServer,
) -> None:
    base = key_server.base_url
    env = {"BETTER_AUTH_URL": base, "JWT_ISSUER": base + "/", "JWT_AUDIENCE": base}
    good = taskctl(env, "--token", KEY.token(ok_claims(key_server, sub="cli-user")))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "accepted: the APIs act as user 'cli-user'" in good.stdout
    from_stdin = taskctl(env, "--token", "-", stdin=KEY.token(ok_claims(key_server)) + "\n")
    assert from_stdin.returncode == 0, from_stdin.stdout + from_stdin.stderr
    wrong = taskctl(env, "--token", KEY.token(claims(iss="http://127.0.0.1:1", aud=base)))
    assert wrong.returncode == 1
    assert "FAIL  issuer: expected issuer" in wrong.stdout


def test_the_command_says_the_key_server_is_down_and_exits_1() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    result = taskctl({"BETTER_AUTH_URL": down})
    assert result.returncode == 1, result.stdout
    assert f"GET {down}/api/auth/jwks: FAILS after" in result.stdout
    assert "connection refused" in result.stdout
    with_token = taskctl({"BETTER_AUTH_URL": down}, "--token", KEY.token(claims()))
    assert with_token.returncode == 1
    last = with_token.stdout.splitlines()[-1]
    assert last == ("refused (keys_unavailable): the APIs answer 503"
                    " 'Authentication keys unavailable, try again shortly'")


def test_the_command_refuses_a_malformed_issuer_setting_with_a_sentence() -> None:
    result = taskctl({"BETTER_AUTH_URL": "http://127.0.0.1:1",
                      "JWT_ISSUER": "https:/auth.example.com"})
    assert result.returncode == 1
    assert "JWT_ISSUER" in result.stderr and "is not a URL like https://" in result.stderr
