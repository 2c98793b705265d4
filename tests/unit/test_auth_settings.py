"""Auth settings that cannot be wrong quietly: JWT_ISSUER / JWT_AUDIENCE normalised as
Better Auth writes its base URL (or refused at start-up with a sentence), tokens'
iss / aud compared the same way, the JWKS URL read from BETTER_AUTH_URL as Better Auth
reads its baseURL, ES512 keys, HS256 only with a secret, and a MAX_TOKEN_BYTES that
fits Better Auth's default payload. No I/O: HS256 tokens and parsed key documents."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from shared.auth import Authenticator, Refused, better_auth_base
from shared.errors import ApiError
from shared.jwks import allowed_algorithms, read_jwks
from shared.settings import Settings, SettingsError, normalise_claim_url

SECRET = "unit-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param("https://auth.example.com/", "https://auth.example.com", id="trailing-slash"),
        pytest.param("https://Auth.Example.COM", "https://auth.example.com", id="host-case"),
        pytest.param("HTTPS://auth.example.com", "https://auth.example.com", id="scheme-case"),
        pytest.param("https://auth.example.com:443/", "https://auth.example.com", id="443"),
        pytest.param("http://localhost:80", "http://localhost", id="80"),
        pytest.param("http://localhost:3000//", "http://localhost:3000", id="slashes"),
        pytest.param("  http://127.0.0.1:3000/ ", "http://127.0.0.1:3000", id="spaces"),
        pytest.param("https://example.com/auth/", "https://example.com/auth", id="path"),
        pytest.param("http://[::1]:3000/", "http://[::1]:3000", id="ipv6"),
        pytest.param("my-app", "my-app", id="not-a-url"),
        pytest.param("urn:example:api", "urn:example:api", id="urn"),
    ],
)
def test_issuer_and_audience_are_normalised_like_better_auths_base_url(
    given: str, expected: str
) -> None:
    settings = Settings.from_env({"BETTER_AUTH_URL": "https://auth.example.com",
                                  "JWT_ISSUER": given, "JWT_AUDIENCE": given})
    assert settings.jwt_issuer == settings.jwt_audience == expected


@pytest.mark.parametrize("value", ["https:/auth.example.com", "http://", "https://",
                                   "https://user@auth.example.com", "http://a b.example"])
def test_an_issuer_that_is_no_url_is_refused_with_a_sentence(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"BETTER_AUTH_URL": "https://auth.example.com", "JWT_ISSUER": value})
    message = str(caught.value)
    assert "JWT_ISSUER" in message and "is not a URL like https://auth.example.com" in message
    assert "Better Auth signs with" in message


def test_a_blank_issuer_is_unset() -> None:
    settings = Settings.from_env({"BETTER_AUTH_URL": "https://a.example", "JWT_ISSUER": " "})
    assert settings.jwt_issuer is None


def _hs256(**settings: Any) -> Authenticator:
    return Authenticator(Settings(environment="test", better_auth_secret=SECRET, **settings))


def _token(**claims: Any) -> str:
    now = int(time.time())
    return "Bearer " + jwt.encode({"sub": "u1", "iat": now, "exp": now + 60, **claims},
                                  SECRET, "HS256")


@pytest.mark.parametrize("setting", ["http://localhost:3000", "http://localhost:3000/"])
@pytest.mark.parametrize("claim", ["http://localhost:3000", "http://localhost:3000/",
                                   "http://LOCALHOST:3000"])
async def test_a_trailing_slash_or_case_on_either_side_still_matches(
    setting: str, claim: str
) -> None:
    authenticator = _hs256(jwt_issuer=setting, jwt_audience=setting)
    assert await authenticator.user_id(_token(iss=claim, aud=[claim, "other"])) == "u1"


@pytest.mark.parametrize("claim", ["http://127.0.0.1:3000", "https://localhost:3000",
                                   "http://localhost:3001", "http://localhost:3000/api"])
async def test_another_host_scheme_port_or_path_does_not_match(claim: str) -> None:
    authenticator = _hs256(jwt_issuer="http://localhost:3000")
    with pytest.raises(ApiError) as caught:
        await authenticator.user_id(_token(iss=claim))
    assert caught.value.status == 401


@pytest.mark.parametrize(
    ("url", "jwks"),
    [
        pytest.param("https://auth.example.com", "https://auth.example.com/api/auth/jwks",
                     id="origin"),
        pytest.param("https://auth.example.com/", "https://auth.example.com/api/auth/jwks",
                     id="origin-slash"),
        # Better Auth takes a baseURL with a path as its auth route itself.
        pytest.param("https://example.com/api/auth", "https://example.com/api/auth/jwks",
                     id="auth-path"),
        pytest.param("https://example.com/custom/", "https://example.com/custom/jwks",
                     id="custom-path"),
    ],
)
def test_the_jwks_url_is_read_from_better_auth_url_as_better_auth_reads_its_base_url(
    url: str, jwks: str
) -> None:
    settings = Settings.from_env({"BETTER_AUTH_URL": url})
    assert settings.effective_jwks_url == jwks
    assert better_auth_base(settings) == "https://" + jwks.split("/")[2]


@pytest.mark.parametrize("url", ["https://auth.example.com/api/auth/jwks",
                                 "https://auth.example.com/api/auth/jwks/"])
def test_the_key_sets_own_url_in_better_auth_url_is_refused_with_the_setting_to_use(
    url: str,
) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"BETTER_AUTH_URL": url})
    assert "is the key set's URL" in str(refused.value) and "JWKS_URL" in str(refused.value)
    # With JWKS_URL set the keys come from there; BETTER_AUTH_URL is not used for them.
    settings = Settings.from_env({"BETTER_AUTH_URL": url, "JWKS_URL": url})
    assert settings.effective_jwks_url == url


def test_the_start_up_advice_names_both_settings_and_their_value() -> None:
    authenticator = Authenticator(Settings(environment="test",
                                           better_auth_url="https://Auth.example.com/"))
    (advice,) = authenticator.advice()
    assert advice.startswith("JWT_ISSUER and JWT_AUDIENCE not set")
    assert ("set JWT_ISSUER=https://auth.example.com and"
            " JWT_AUDIENCE=https://auth.example.com") in advice
    both = Authenticator(Settings(environment="test", better_auth_url="https://a.example",
                                  jwt_issuer="https://a.example",
                                  jwt_audience="https://a.example"))
    assert both.advice() == []


def test_production_warns_when_a_secret_is_accepted_beside_the_jwks() -> None:
    authenticator = Authenticator(Settings(
        environment="production", better_auth_url="https://a.example",
        jwt_issuer="https://a.example", jwt_audience="https://a.example",
        better_auth_secret="k3Jx9-Qw7Lp2-Zr8Tn5-Vb4Mc6-Hd1Fs0-Ya"))
    (advice,) = authenticator.advice()
    assert "never signs HS256" in advice


# -- which tokens and keys ---------------------------------------------------------------


async def test_hs256_is_off_without_a_secret() -> None:
    authenticator = Authenticator(Settings(environment="test", jwks_url="http://127.0.0.1:9/j"))
    assert authenticator.secret is None
    token = jwt.encode({"sub": "u1", "exp": int(time.time()) + 60}, SECRET, "HS256")
    with pytest.raises(Refused) as caught:
        await authenticator._verify(token, None)
    assert caught.value.reason == "algorithm"
    assert "BETTER_AUTH_SECRET is not set" in caught.value.detail


def _p(curve: Any) -> dict[str, Any]:
    return ECAlgorithm.to_jwk(ec.generate_private_key(curve).public_key(), as_dict=True)


def test_es512_keys_are_read_and_fixed_to_es512() -> None:
    p521 = _p(ec.SECP521R1())
    assert allowed_algorithms(p521) == {"ES512"}
    assert allowed_algorithms({**p521, "alg": "ES512"}) == {"ES512"}
    assert allowed_algorithms({**p521, "alg": "ES256"}) == set()
    assert allowed_algorithms({**_p(ec.SECP256R1()), "alg": "ES512"}) == set()
    keys, skipped = read_jwks({"keys": [{**p521, "alg": "ES512", "kid": "k"}]})
    assert [(k.kid, k.kind, k.algorithms) for k in keys] == [("k", "EC P-521", {"ES512"})]
    assert skipped == []


def test_a_skipped_key_says_why() -> None:
    _, skipped = read_jwks({"keys": [{**_p(ec.SECP384R1()), "kid": "p384"}, "junk",
                                     {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
                                     {**_p(ec.SECP256R1()), "kid": "enc", "use": "enc"}]})
    assert skipped[0].startswith("kid 'p384': EC P-384 key; this service verifies")
    assert skipped[1] == "entry 2: not a JSON object"
    assert skipped[2].startswith("kid 'hmac': oct key")
    assert skipped[3] == "kid 'enc': use 'enc', not a signing key"


async def test_better_auths_default_payload_with_a_data_url_avatar_fits_the_default() -> None:
    # Better Auth signs the whole user unless jwt.definePayload says otherwise.
    user = {"id": "Uq1fW3x9sJ2kLm0PqRsT4vWxYz5AbCdE", "name": "Ada", "email": "ada@example.com",
            "emailVerified": True, "image": "data:image/png;base64," + "iVBORw0KGgo" * 560,
            "createdAt": "2026-01-02T03:04:05.678Z", "updatedAt": "2026-01-02T03:04:05.678Z"}
    now = int(time.time())
    token = jwt.encode({**user, "sub": user["id"], "iat": now, "exp": now + 900,
                        "iss": "https://auth.example.com", "aud": "https://auth.example.com"},
                       SECRET, "HS256")
    assert len(token) > 8_600  # the 8.6 KB token that the old 8,192-byte limit refused
    authenticator = Authenticator(Settings(environment="test", better_auth_secret=SECRET))
    assert authenticator.max_token_bytes == 16_384
    assert await authenticator.user_id(f"Bearer {token}") == user["id"]


def test_normalise_leaves_what_it_cannot_read_as_given() -> None:
    assert normalise_claim_url("http://[::1") == "http://[::1"
    assert normalise_claim_url("https://auth.example.com/x", origin_only=True) == (
        "https://auth.example.com")
