"""The pure parts of auth: HS256 verification, subject rules, which key verifies which
algorithm, JWKS parsing, token minting, and the auth settings refusing to start unsafe."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from shared.auth import (
    EXPIRED,
    INVALID,
    MISSING,
    Authenticator,
    allowed_algorithms,
    mint_token,
    parse_jwks,
)
from shared.errors import Unauthorized
from shared.settings import Settings, SettingsError

SECRET = "unit-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
STRONG_SECRET = "k3Jx9-Qw7Lp2-Zr8Tn5-Vb4Mc6-Hd1Fs0-Ya"


def hs256(secret: str = SECRET, **overrides: Any) -> Authenticator:
    return Authenticator(Settings(environment="test", better_auth_secret=secret, **overrides))


def token(claims: dict[str, Any], secret: str = SECRET, **header: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=header or None)


def valid_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "user-1", "iat": now, "exp": now + 60, **extra}


async def refused(authenticator: Authenticator, header: str | None) -> str:
    with pytest.raises(Unauthorized) as caught:
        await authenticator.user_id(header)
    assert caught.value.status == 401
    assert caught.value.headers == {"WWW-Authenticate": "Bearer"}
    return caught.value.message


# -- HS256 ------------------------------------------------------------------------------


async def test_minted_token_verifies_as_its_user() -> None:
    assert await hs256().user_id(f"Bearer {mint_token(SECRET, 'alice')}") == "alice"


def test_minted_token_carries_issuer_audience_and_expiry() -> None:
    minted = mint_token(SECRET, "alice", ttl_seconds=120, issuer="https://auth", audience="api")
    claims = jwt.decode(minted, SECRET, algorithms=["HS256"], audience="api")
    assert claims["sub"] == "alice"
    assert claims["iss"] == "https://auth"
    assert claims["exp"] - claims["iat"] == 120
    assert jwt.get_unverified_header(minted)["alg"] == "HS256"


async def test_subject_is_kept_as_an_opaque_string() -> None:
    sub = "Uq1fW3x9sJ2kLm0PqRsT4vWxYz5AbCdE"
    assert await hs256().user_id(f"Bearer {token(valid_claims(sub=sub))}") == sub


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Token abc", "Bearer-abc"])
async def test_missing_or_other_scheme_says_header_required(header: str | None) -> None:
    assert await refused(hs256(), header) == MISSING


@pytest.mark.parametrize(
    "sub",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("x" * 256, id="too-long"),
        pytest.param("alice\nadmin", id="newline"),
        pytest.param("alice\x00", id="nul"),
        pytest.param("alice\ud800", id="lone-surrogate"),
        pytest.param("\udfff", id="lone-low-surrogate"),
        pytest.param(42, id="number"),
        pytest.param(["alice"], id="list"),
        pytest.param(None, id="null"),
    ],
)
async def test_unusable_subject_is_refused(sub: Any) -> None:
    assert await refused(hs256(), f"Bearer {token(valid_claims(sub=sub))}") == INVALID


@pytest.mark.parametrize(
    "claim",
    [
        pytest.param({"exp": str(int(time.time()) + 86_400)}, id="numeric-text-exp"),
        pytest.param({"exp": f"{time.time() + 86_400:.3f}"}, id="decimal-text-exp"),
        pytest.param({"exp": 10**400}, id="exp-beyond-float"),
        pytest.param({"exp": float("inf")}, id="infinite-exp"),
        pytest.param({"exp": float("nan")}, id="nan-exp"),
        pytest.param({"iat": "0"}, id="numeric-text-iat"),
        pytest.param({"iat": None}, id="null-iat"),
        pytest.param({"iat": False}, id="boolean-iat"),
        pytest.param({"nbf": "0"}, id="numeric-text-nbf"),
        pytest.param({"nbf": [0]}, id="list-nbf"),
        pytest.param({"nbf": -(10**400)}, id="nbf-beyond-float"),
    ],
)
async def test_time_claims_must_be_json_numbers(claim: dict[str, Any]) -> None:
    assert await refused(hs256(), f"Bearer {token(valid_claims(**claim))}") == INVALID


async def test_fractional_time_claims_are_numbers_too() -> None:
    now = time.time()
    claims = valid_claims(exp=now + 60.5, iat=now - 0.25, nbf=now - 1.5)
    authenticator = hs256()
    assert await authenticator.user_id(f"Bearer {token(claims)}") == "user-1"
    assert await authenticator.user_id(f"Bearer {token(claims)}") == "user-1"  # remembered


async def test_longest_allowed_subject_is_accepted() -> None:
    sub = "x" * 255
    assert await hs256().user_id(f"Bearer {token(valid_claims(sub=sub))}") == sub


async def test_expired_token_says_expired_and_leeway_forgives_skew() -> None:
    stale = token(valid_claims(exp=int(time.time()) - 10))
    assert await refused(hs256(), f"Bearer {stale}") == EXPIRED
    assert await hs256(jwt_leeway=30).user_id(f"Bearer {stale}") == "user-1"


async def test_a_remembered_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    authenticator = hs256()
    now = time.time()
    header = f"Bearer {token(valid_claims(exp=int(now) + 3))}"
    assert await authenticator.user_id(header) == "user-1"
    assert await authenticator.user_id(header) == "user-1"  # remembered
    monkeypatch.setattr(time, "time", lambda: now + 10)
    assert await refused(authenticator, header) == EXPIRED


async def test_a_remembered_token_is_not_honoured_for_another_header() -> None:
    authenticator = hs256()
    good = token(valid_claims())
    assert await authenticator.user_id(f"Bearer {good}") == "user-1"
    assert await refused(authenticator, f"Bearer {good[:-2]}xx") == INVALID


@pytest.mark.parametrize(
    "header",
    [
        pytest.param({"alg": ["HS256"]}, id="list-alg"),
        pytest.param({"alg": {"HS256": True}}, id="object-alg"),
        pytest.param({"alg": None}, id="null-alg"),
        pytest.param({"alg": "hs256"}, id="lowercase-alg"),
        pytest.param({"alg": "HS512"}, id="other-hmac"),
        pytest.param({"alg": "none"}, id="none"),
    ],
)
async def test_header_algorithm_other_than_hs256_is_refused(header: dict[str, Any]) -> None:
    def seg(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    forged = f"{seg(header)}.{seg(valid_claims())}.c2lnbmF0dXJl"
    assert await refused(hs256(), f"Bearer {forged}") == INVALID


async def test_token_longer_than_the_limit_is_refused_before_decoding() -> None:
    authenticator = hs256(max_token_bytes=1024)
    small = token(valid_claims(pad="x" * 500))
    large = token(valid_claims(pad="x" * 1000))
    assert await authenticator.user_id(f"Bearer {small}") == "user-1"
    assert await refused(authenticator, f"Bearer {large}") == INVALID


async def test_surrounding_whitespace_around_the_token_is_tolerated() -> None:
    assert await hs256().user_id(f"Bearer   {token(valid_claims())}  ") == "user-1"


async def test_asymmetric_algorithm_without_jwks_is_refused() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    signed = jwt.encode(valid_claims(), key, algorithm="EdDSA", headers={"kid": "k"})
    assert await refused(hs256(), f"Bearer {signed}") == INVALID


# -- which key verifies which algorithm ------------------------------------------------


def _jwk(private: Any, algorithm: type, **extra: Any) -> dict[str, Any]:
    return {**algorithm.to_jwk(private.public_key(), as_dict=True), **extra}


ED = _jwk(ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm)
P256 = _jwk(ec.generate_private_key(ec.SECP256R1()), ECAlgorithm)
P384 = _jwk(ec.generate_private_key(ec.SECP384R1()), ECAlgorithm)
RSA = _jwk(rsa.generate_private_key(65537, 2048), RSAAlgorithm)


@pytest.mark.parametrize(
    ("jwk", "expected"),
    [
        pytest.param(ED, {"EdDSA"}, id="ed25519"),
        pytest.param({**ED, "alg": "EdDSA"}, {"EdDSA"}, id="ed25519-declared"),
        pytest.param({**ED, "alg": "ES256"}, set(), id="ed25519-declared-es256"),
        pytest.param({**ED, "crv": "X25519"}, set(), id="x25519"),
        pytest.param(P256, {"ES256"}, id="p256"),
        pytest.param({**P256, "alg": "ES256"}, {"ES256"}, id="p256-declared"),
        pytest.param(P384, set(), id="p384"),
        pytest.param({**P384, "alg": "ES256"}, set(), id="p384-declared-es256"),
        pytest.param(RSA, {"RS256", "PS256"}, id="rsa"),
        pytest.param({**RSA, "alg": "RS256"}, {"RS256"}, id="rsa-declared-rs256"),
        pytest.param({**RSA, "alg": "PS256"}, {"PS256"}, id="rsa-declared-ps256"),
        pytest.param({**RSA, "alg": "RS512"}, set(), id="rsa-declared-rs512"),
        pytest.param({**RSA, "alg": ["RS256"]}, set(), id="rsa-declared-list"),
        pytest.param({"kty": "oct", "k": "c2VjcmV0"}, set(), id="symmetric"),
        pytest.param({"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}, set(), id="symmetric-hs256"),
    ],
)
def test_key_verifies_only_the_algorithms_of_its_type(
    jwk: dict[str, Any], expected: set[str]
) -> None:
    assert allowed_algorithms(jwk) == expected


def test_jwks_parsing_keeps_good_keys_and_skips_the_rest() -> None:
    document = {
        "keys": [
            {**ED, "alg": "EdDSA", "kid": "ed"},
            {**P256, "alg": "ES256", "kid": "es"},
            {**RSA, "alg": "PS256", "kid": "ps"},
            "junk",
            {"kty": "EC", "kid": "broken"},
            {**ED, "kid": 7},
            {**RSA, "kid": "enc", "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {**P384, "kid": "p384"},
        ]
    }
    keys = parse_jwks(document)
    assert set(keys) == {"ed", "es", "ps"}
    assert keys["ed"][1] == {"EdDSA"}
    assert isinstance(keys["ed"][0].key, ed25519.Ed25519PublicKey)
    assert keys["ps"][1] == {"PS256"}


@pytest.mark.parametrize("document", [[], {"keys": None}, {"nokeys": []}, "keys"])
def test_jwks_document_without_a_key_list_is_an_error(document: Any) -> None:
    with pytest.raises(ValueError):
        parse_jwks(document)


# -- settings refuse to start without auth or with an unsafe secret -------------------


def test_refuses_to_start_without_any_auth_method() -> None:
    with pytest.raises(SettingsError, match="BETTER_AUTH_SECRET") as caught:
        Settings.from_env({"ENVIRONMENT": "development"})
    assert "BETTER_AUTH_URL" in str(caught.value)


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("changeme", id="changeme"),
        pytest.param("  Secret  ", id="secret-padded"),
        pytest.param("your-secret-here", id="your-secret-here"),
        pytest.param("dev-" + "x" * 40, id="dev-prefix"),
        pytest.param("short-but-real-7f3a", id="short"),
        pytest.param(" " * 40, id="blank"),
        pytest.param("  " + "a" * 20 + " " * 20, id="short-once-trimmed"),
    ],
)
def test_production_refuses_placeholder_or_short_secret(secret: str) -> None:
    with pytest.raises(SettingsError, match="BETTER_AUTH_SECRET"):
        Settings.from_env({"BETTER_AUTH_SECRET": secret})


def test_production_is_the_default_environment() -> None:
    with pytest.raises(SettingsError, match="BETTER_AUTH_SECRET"):
        Settings.from_env({"BETTER_AUTH_SECRET": "changeme"})
    assert Settings.from_env({"BETTER_AUTH_SECRET": STRONG_SECRET}).environment == "production"


def test_development_accepts_a_short_secret() -> None:
    settings = Settings.from_env({"ENVIRONMENT": "development", "BETTER_AUTH_SECRET": "dev-secret"})
    assert settings.better_auth_secret == "dev-secret"


def test_production_accepts_jwks_alone() -> None:
    settings = Settings.from_env({"BETTER_AUTH_URL": "https://auth.example.com/"})
    assert settings.better_auth_secret is None
    assert settings.effective_jwks_url == "https://auth.example.com/api/auth/jwks"


def test_explicit_jwks_url_wins_over_the_base_url() -> None:
    settings = Settings.from_env(
        {"BETTER_AUTH_URL": "https://auth.example.com", "JWKS_URL": "https://keys.example.com/jwks"}
    )
    assert settings.effective_jwks_url == "https://keys.example.com/jwks"


def test_negative_refetch_interval_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="JWKS_REFETCH_INTERVAL"):
        Settings.from_env({"BETTER_AUTH_SECRET": STRONG_SECRET, "JWKS_REFETCH_INTERVAL": "-1"})
