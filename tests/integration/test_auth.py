"""JWT auth through the real command API: Better Auth JWKS keys served over real HTTP,
HS256 with the shared secret, and the attacks a bearer-token API must refuse."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from command_api.app import create_app
from shared.auth import EXPIRED, INVALID, MISSING, JwksCache
from shared.settings import Settings
from tests.support import TEST_SECRET, bearer, new_user

JWKS_PATH = "/api/auth/jwks"


# -- keys, as a Better Auth server's JWT plugin publishes them -------------------------


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private: Any
    jwk: dict[str, Any]

    def token(self, claims: dict[str, Any], **header: Any) -> str:
        headers = {"kid": self.kid, **header}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=headers)

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _published(private: Any, algorithm: type, alg: str) -> SigningKey:
    kid = uuid.uuid4().hex
    public = algorithm.to_jwk(private.public_key(), as_dict=True)
    # Better Auth: {alg, crv?, ...exportJWK(publicKey), kid}
    return SigningKey(kid, alg, private, {"alg": alg, **public, "kid": kid})


@dataclass(frozen=True)
class Keys:
    ed: SigningKey
    es: SigningKey
    rs: SigningKey
    ps: SigningKey
    stranger: SigningKey  # never published

    @property
    def published(self) -> list[SigningKey]:
        return [self.ed, self.es, self.rs, self.ps]


def new_ed25519() -> SigningKey:
    return _published(ed25519.Ed25519PrivateKey.generate(), OKPAlgorithm, "EdDSA")


# Generated once per test run, at import, so the rejection cases can be parameters.
KEYS = Keys(
    ed=new_ed25519(),
    es=_published(ec.generate_private_key(ec.SECP256R1()), ECAlgorithm, "ES256"),
    rs=_published(rsa.generate_private_key(65537, 2048), RSAAlgorithm, "RS256"),
    ps=_published(rsa.generate_private_key(65537, 2048), RSAAlgorithm, "PS256"),
    stranger=new_ed25519(),
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return KEYS


def claims(sub: str | None = None, ttl: int = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    result: dict[str, Any] = {"sub": sub or new_user(), "iat": now, "exp": now + ttl}
    result.update(extra)
    return result


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256_by_hand(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """HS256 without PyJWT's guard against asymmetric keys as HMAC secrets."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def ed25519_by_hand(header: dict[str, Any], payload: dict[str, Any], key: SigningKey) -> str:
    """EdDSA with any header, even one PyJWT would refuse to write."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(key.private.sign(signing_input.encode()))}"


def forged_as(key: SigningKey, payload: dict[str, Any]) -> str:
    """Signed by a key nobody published, under the kid of one that is."""
    return jwt.encode(payload, KEYS.stranger.private, "EdDSA", {"kid": key.kid})


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: str = "") -> str:
    head, body = b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode())
    return f"{head}.{body}.{signature}"


# -- a JWKS server on 127.0.0.1, started and stopped by the tests ----------------------


@dataclass
class JwksServer:
    keys: list[dict[str, Any]]
    status: int = 200
    body: bytes | None = None  # served instead of the key set when set
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    status, body = server.status, server.body
                    document = {"keys": list(server.keys)}
                if self.path != JWKS_PATH:
                    status, body = 404, b"{}"
                payload = body if body is not None else json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def publish(self, key: SigningKey) -> None:
        with self._lock:
            self.keys.append(key.jwk)


@pytest.fixture
def start_jwks() -> Iterator[Callable[..., JwksServer]]:
    servers: list[JwksServer] = []

    def start(published: list[SigningKey], **kwargs: Any) -> JwksServer:
        server = JwksServer([k.jwk for k in published], **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: a server we started and stopped."""
    server = JwksServer([])
    server.start()
    url = server.base_url
    server.stop()
    return url


# -- command API apps with a given auth configuration ---------------------------------


@pytest.fixture(scope="module")
def app_stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def _client(stack: ExitStack, database_url: str, **auth: Any) -> TestClient:
    settings = Settings(environment="test", database_url=database_url, **auth)
    return stack.enter_context(TestClient(create_app(settings), raise_server_exceptions=False))


@pytest.fixture
def make_client(database_url: str) -> Iterator[Callable[..., TestClient]]:
    with ExitStack() as stack:
        yield lambda **auth: _client(stack, database_url, **auth)


@pytest.fixture(scope="module")
def shared_jwks(keys: Keys) -> Iterator[JwksServer]:
    server = JwksServer([k.jwk for k in keys.published])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def jwks_client(app_stack: ExitStack, database_url: str, shared_jwks: JwksServer) -> TestClient:
    """JWKS only, the Better Auth JWT plugin setup."""
    return _client(app_stack, database_url, better_auth_url=shared_jwks.base_url)


@pytest.fixture(scope="module")
def both_client(app_stack: ExitStack, database_url: str, shared_jwks: JwksServer) -> TestClient:
    """JWKS and the HS256 shared secret together."""
    return _client(
        app_stack,
        database_url,
        better_auth_url=shared_jwks.base_url,
        better_auth_secret=TEST_SECRET,
    )


@pytest.fixture(scope="module")
def strict_client(app_stack: ExitStack, database_url: str, shared_jwks: JwksServer) -> TestClient:
    """JWKS with JWT_ISSUER and JWT_AUDIENCE set to the Better Auth base URL (its defaults)."""
    base = shared_jwks.base_url
    return _client(
        app_stack, database_url, better_auth_url=base, jwt_issuer=base, jwt_audience=base
    )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create(client: TestClient, headers: dict[str, str], title: str = "Buy milk") -> Any:
    return client.post("/api/tasks", json={"title": title}, headers=headers)


def assert_unauthorized(response: Any, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    assert set(body) == {"error", "detail", "meta"}
    assert body["error"] == {"code": "UNAUTHORIZED", "message": message}
    assert set(body["meta"]) == {"timestamp", "request_id"}


# -- accepted tokens act as their subject ---------------------------------------------


@pytest.mark.parametrize("name", ["ed", "es", "rs", "ps"])
def test_token_from_published_key_acts_as_its_subject(
    jwks_client: TestClient, keys: Keys, name: str
) -> None:
    key: SigningKey = getattr(keys, name)
    user = new_user()
    token = key.token(claims(user))

    created = create(jwks_client, auth(token))
    assert created.status_code == 201, created.text
    assert created.json()["data"]["user_id"] == user

    deleted = jwks_client.delete(f"/api/tasks/{created.json()['data']['id']}", headers=auth(token))
    assert deleted.status_code == 204


def test_tokens_of_different_algorithms_for_one_subject_are_one_user(
    jwks_client: TestClient, keys: Keys
) -> None:
    owner, other = new_user(), new_user()
    task = create(jwks_client, auth(keys.ed.token(claims(owner)))).json()["data"]

    url = f"/api/tasks/{task['id']}"
    as_other = jwks_client.delete(url, headers=auth(keys.rs.token(claims(other))))
    assert as_other.status_code == 403

    as_owner = jwks_client.delete(url, headers=auth(keys.es.token(claims(owner))))
    assert as_owner.status_code == 204


def test_lowercase_bearer_scheme_is_accepted(jwks_client: TestClient, keys: Keys) -> None:
    response = create(jwks_client, {"Authorization": f"bearer {keys.ed.token(claims())}"})
    assert response.status_code == 201


def test_iat_in_the_future_is_accepted(jwks_client: TestClient, keys: Keys) -> None:
    """`iat` is informational (RFC 7519, README "Auth"): a key server whose clock runs
    ahead of ours mints tokens "issued" in our future, and they must work at once. PyJWT
    would refuse them (ImmatureSignatureError) unless told not to."""
    ahead = int(time.time()) + 3000
    response = create(jwks_client, auth(keys.ed.token(claims(iat=ahead, exp=ahead + 300))))
    assert response.status_code == 201, response.text


# -- rejected requests: 401 in the envelope, one of three messages --------------------


def _rejections(k: Keys) -> list[Any]:
    def p(id_: str, headers: Callable[[], dict[str, str]], message: str) -> Any:
        return pytest.param(headers, message, id=id_)

    def bearer_of(make: Callable[[], str]) -> Callable[[], dict[str, str]]:
        return lambda: auth(make())

    # Read the clock when a test builds its token, not at collection: a suite that runs longer
    # than these offsets would otherwise send a "not yet valid" token that has become valid.
    def past() -> int:
        return int(time.time()) - 120

    def future() -> int:
        return int(time.time()) + 600

    return [
        p("missing-header", lambda: {}, MISSING),
        p("basic-scheme", lambda: {"Authorization": "Basic dXNlcjpwYXNz"}, MISSING),
        p("token-without-scheme", lambda: {"Authorization": k.ed.token(claims())}, MISSING),
        p("empty-token", lambda: {"Authorization": "Bearer"}, INVALID),
        p("blank-token", lambda: {"Authorization": "Bearer    "}, INVALID),
        p("garbage", bearer_of(lambda: "not-a-jwt"), INVALID),
        p("garbage-segments", bearer_of(lambda: "a.b.c"), INVALID),
        p(
            "non-ascii-byte",
            lambda: {"Authorization": f"Bearer \xe9{k.ed.token(claims())}".encode("latin-1")},
            INVALID,
        ),
        p(
            "signed-by-unpublished-key-under-published-kid",
            bearer_of(lambda: forged_as(k.ed, claims())),
            INVALID,
        ),
        p(
            "tampered-payload",
            bearer_of(lambda: _tampered(k.ed.token(claims()))),
            INVALID,
        ),
        p(
            "alg-none-unsigned",
            bearer_of(lambda: jwt.encode(claims(), None, "none", {"kid": k.ed.kid})),
            INVALID,
        ),
        p(
            "alg-none-with-signature",
            bearer_of(lambda: unsigned({"alg": "none", "kid": k.ed.kid}, claims(), "c2ln")),
            INVALID,
        ),
        p(
            "hs256-keyed-with-public-pem",
            bearer_of(
                lambda: hs256_by_hand({"alg": "HS256", "kid": k.ed.kid}, claims(), k.ed.public_pem)
            ),
            INVALID,
        ),
        p(
            "hs256-keyed-with-public-jwk",
            bearer_of(
                lambda: hs256_by_hand(
                    {"alg": "HS256", "kid": k.rs.kid}, claims(), json.dumps(k.rs.jwk).encode()
                )
            ),
            INVALID,
        ),
        p(
            "expired",
            bearer_of(lambda: k.ed.token(claims(exp=past(), iat=past() - 300))),
            EXPIRED,
        ),
        p(
            "expired-and-forged-says-invalid-not-expired",
            bearer_of(lambda: forged_as(k.ed, claims(exp=past()))),
            INVALID,
        ),
        p("not-yet-valid", bearer_of(lambda: k.ed.token(claims(nbf=future()))), INVALID),
        p("missing-sub", bearer_of(lambda: k.ed.token({"exp": int(time.time()) + 300})), INVALID),
        p("empty-sub", bearer_of(lambda: k.ed.token(claims() | {"sub": ""})), INVALID),
        p("numeric-sub", bearer_of(lambda: k.ed.token(claims() | {"sub": 42})), INVALID),
        p("missing-exp", bearer_of(lambda: k.ed.token({"sub": new_user()})), INVALID),
        p("text-exp", bearer_of(lambda: k.ed.token(claims() | {"exp": "tomorrow"})), INVALID),
        p(
            "numeric-text-exp",
            bearer_of(lambda: k.ed.token(claims() | {"exp": str(int(time.time()) + 300)})),
            INVALID,
        ),
        p("numeric-text-iat", bearer_of(lambda: k.ed.token(claims() | {"iat": "1"})), INVALID),
        p("numeric-text-nbf", bearer_of(lambda: k.ed.token(claims() | {"nbf": "1"})), INVALID),
        p("boolean-iat", bearer_of(lambda: k.ed.token(claims() | {"iat": True})), INVALID),
        p("huge-exp", bearer_of(lambda: k.ed.token(claims() | {"exp": 10**400})), INVALID),
        p("lone-surrogate-sub", bearer_of(lambda: k.ed.token(claims(sub="u\ud800"))), INVALID),
        p(
            "unknown-kid",
            bearer_of(lambda: k.stranger.token(claims())),
            INVALID,
        ),
        p("no-kid", bearer_of(lambda: jwt.encode(claims(), k.ed.private, "EdDSA")), INVALID),
        p(
            "integer-kid",
            bearer_of(lambda: ed25519_by_hand({"alg": "EdDSA", "kid": 1}, claims(), k.ed)),
            INVALID,
        ),
        p(
            "list-kid",
            bearer_of(lambda: ed25519_by_hand({"alg": "EdDSA", "kid": [k.ed.kid]}, claims(), k.ed)),
            INVALID,
        ),
        p("list-alg", bearer_of(lambda: unsigned({"alg": ["EdDSA"]}, claims(), "c2ln")), INVALID),
        p("object-alg", bearer_of(lambda: unsigned({"alg": {"x": 1}}, claims(), "c2ln")), INVALID),
        p(
            "oversized",
            bearer_of(lambda: k.ed.token(claims(padding="x" * 17_000))),
            INVALID,
        ),
        p(
            "es256-header-on-ed25519-kid",
            bearer_of(lambda: jwt.encode(claims(), k.es.private, "ES256", {"kid": k.ed.kid})),
            INVALID,
        ),
        p(
            "eddsa-header-on-p256-kid",
            bearer_of(lambda: jwt.encode(claims(), k.ed.private, "EdDSA", {"kid": k.es.kid})),
            INVALID,
        ),
        p(
            "ps256-on-key-published-for-rs256",
            bearer_of(lambda: jwt.encode(claims(), k.rs.private, "PS256", {"kid": k.rs.kid})),
            INVALID,
        ),
        p(
            "rs512-not-allowed",
            bearer_of(lambda: jwt.encode(claims(), k.rs.private, "RS512", {"kid": k.rs.kid})),
            INVALID,
        ),
        p(
            "embedded-jwk-header-is-not-trusted",
            bearer_of(
                lambda: jwt.encode(
                    claims(),
                    k.stranger.private,
                    "EdDSA",
                    {
                        "kid": k.stranger.kid,
                        "jwk": k.stranger.jwk,
                        "jku": "http://127.0.0.1:1/jwks",
                    },
                )
            ),
            INVALID,
        ),
        p(
            "unknown-crit-header",
            bearer_of(lambda: k.ed.token(claims(), crit=["exp-policy"], **{"exp-policy": 1})),
            INVALID,
        ),
    ]


def _tampered(token: str) -> str:
    header, _, signature = token.split(".")
    payload = b64url(json.dumps(claims(sub="someone-else")).encode())
    return f"{header}.{payload}.{signature}"


REJECTIONS = _rejections(KEYS)


@pytest.mark.parametrize(("headers", "message"), REJECTIONS)
def test_create_is_refused_with_401(
    jwks_client: TestClient, headers: Callable[[], dict[str, str]], message: str
) -> None:
    assert_unauthorized(create(jwks_client, headers()), message)


@pytest.mark.parametrize(("headers", "message"), REJECTIONS)
def test_refused_with_401_when_shared_secret_is_also_configured(
    both_client: TestClient, headers: Callable[[], dict[str, str]], message: str
) -> None:
    assert_unauthorized(create(both_client, headers()), message)


def test_delete_with_forged_token_is_refused_and_leaves_the_task(
    jwks_client: TestClient, keys: Keys
) -> None:
    owner = new_user()
    task = create(jwks_client, auth(keys.ed.token(claims(owner)))).json()["data"]
    forged = forged_as(keys.ed, claims(owner))

    url = f"/api/tasks/{task['id']}"
    assert_unauthorized(jwks_client.delete(url, headers=auth(forged)), INVALID)
    again = jwks_client.delete(url, headers=auth(keys.ed.token(claims(owner))))
    assert again.status_code == 204


def test_auth_is_checked_before_body_and_path_validation(jwks_client: TestClient) -> None:
    assert_unauthorized(jwks_client.post("/api/tasks", json={"title": ""}), MISSING)
    assert_unauthorized(jwks_client.delete("/api/tasks/not-a-uuid", headers=auth("x.y.z")), INVALID)
    # A body that is not even JSON: FastAPI parses it before any dependency runs.
    malformed = {"Content-Type": "application/json"}
    assert_unauthorized(jwks_client.post("/api/tasks", content=b"{not json", headers=malformed), MISSING)
    assert_unauthorized(
        jwks_client.patch("/api/tasks/not-a-uuid", content=b"[", headers={**malformed, **auth("x.y.z")}),
        INVALID,
    )


def test_a_malformed_body_with_a_valid_token_is_still_a_422(
    jwks_client: TestClient, keys: Keys
) -> None:
    response = jwks_client.post(
        "/api/tasks", content=b"{not json",
        headers={"Content-Type": "application/json", **auth(keys.ed.token(claims()))},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == {"body": "Malformed JSON"}


def test_large_token_under_the_limit_is_accepted(jwks_client: TestClient, keys: Keys) -> None:
    token = keys.ed.token(claims(padding="x" * 4000))
    assert 4000 < len(token) <= 8192
    assert create(jwks_client, auth(token)).status_code == 201


# -- issuer and audience, when configured ---------------------------------------------


def test_right_issuer_and_audience_are_accepted(
    strict_client: TestClient, shared_jwks: JwksServer, keys: Keys
) -> None:
    base = shared_jwks.base_url
    token = keys.ed.token(claims(iss=base, aud=base))
    assert create(strict_client, auth(token)).status_code == 201


def test_audience_list_containing_ours_is_accepted(
    strict_client: TestClient, shared_jwks: JwksServer, keys: Keys
) -> None:
    base = shared_jwks.base_url
    token = keys.es.token(claims(iss=base, aud=["https://elsewhere.example", base]))
    assert create(strict_client, auth(token)).status_code == 201


@pytest.mark.parametrize(
    "override",
    [
        pytest.param({"iss": "https://evil.example"}, id="wrong-iss"),
        pytest.param({"aud": "https://evil.example"}, id="wrong-aud"),
        pytest.param({"iss": None}, id="missing-iss"),
        pytest.param({"aud": None}, id="missing-aud"),
    ],
)
def test_wrong_or_missing_issuer_or_audience_is_refused(
    strict_client: TestClient, shared_jwks: JwksServer, keys: Keys, override: dict[str, Any]
) -> None:
    base = shared_jwks.base_url
    payload = claims(iss=base, aud=base)
    for name, value in override.items():
        if value is None:
            del payload[name]
        else:
            payload[name] = value
    assert_unauthorized(create(strict_client, auth(keys.ed.token(payload))), INVALID)


def test_issuer_and_audience_are_not_required_when_not_configured(
    jwks_client: TestClient, keys: Keys
) -> None:
    token = keys.ed.token(claims(iss="https://anyone.example", aud="whatever"))
    assert create(jwks_client, auth(token)).status_code == 201


# -- the JWKS: fetched once, refetched for unknown kids, rate-limited -----------------


def test_jwks_is_fetched_once_for_many_requests(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks(keys.published)
    client = make_client(better_auth_url=server.base_url)

    for key in keys.published * 3:
        assert create(client, auth(key.token(claims()))).status_code == 201
    assert server.requests == 1


def test_unknown_kid_refetches_at_most_once_per_interval(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks(keys.published)
    client = make_client(better_auth_url=server.base_url, jwks_refetch_interval=30)
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201
    assert server.requests == 1

    # The first request fetched moments ago: unknown kids wait for the interval.
    for _ in range(5):
        kid = uuid.uuid4().hex
        forged = jwt.encode(claims(), keys.stranger.private, "EdDSA", {"kid": kid})
        assert_unauthorized(create(client, auth(forged)), INVALID)
    assert server.requests == 1
    assert create(client, auth(keys.rs.token(claims()))).status_code == 201
    assert server.requests == 1


def test_unknown_kid_refetches_again_once_the_interval_has_passed(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks(keys.published)
    client = make_client(better_auth_url=server.base_url, jwks_refetch_interval=0.3)
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201
    assert server.requests == 1  # at start-up
    stranger = keys.stranger.token(claims())

    time.sleep(0.35)
    assert_unauthorized(create(client, auth(stranger)), INVALID)
    assert server.requests == 2
    started = time.monotonic()
    assert_unauthorized(create(client, auth(stranger)), INVALID)  # waits for the next slot
    assert time.monotonic() - started >= 0.2
    assert server.requests == 3


def test_rotated_key_is_picked_up_through_the_unknown_kid_refetch(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks([keys.ed])
    client = make_client(better_auth_url=server.base_url, jwks_refetch_interval=0.3)
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201

    rotated = new_ed25519()
    server.publish(rotated)
    time.sleep(0.35)
    user = new_user()
    response = create(client, auth(rotated.token(claims(user))))
    assert response.status_code == 201, response.text
    assert response.json()["data"]["user_id"] == user
    assert server.requests == 2
    # The previous key is still published and still cached: no further fetch.
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201
    assert server.requests == 2


def test_key_published_within_the_interval_waits_for_it(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks([keys.ed])
    client = make_client(better_auth_url=server.base_url, jwks_refetch_interval=30)
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201

    rotated = new_ed25519()
    server.publish(rotated)
    assert_unauthorized(create(client, auth(rotated.token(claims()))), INVALID)
    assert server.requests == 1


def test_unusable_entries_in_the_jwks_do_not_hide_the_good_keys(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks([])
    server.keys.extend(
        [
            "not-a-key",
            {"kty": "EC", "kid": "broken"},
            {**keys.es.jwk, "kid": {"nested": True}},
            {"kty": "oct", "k": b64url(b"shared"), "kid": "symmetric"},
            {**keys.rs.jwk, "kid": "for-encryption", "use": "enc"},
            keys.ed.jwk,
        ]
    )
    client = make_client(better_auth_url=server.base_url)

    assert create(client, auth(keys.ed.token(claims()))).status_code == 201
    symmetric = hs256_by_hand({"alg": "HS256", "kid": "symmetric"}, claims(), b"shared")
    assert_unauthorized(create(client, auth(symmetric)), INVALID)
    enc = jwt.encode(claims(), keys.rs.private, "RS256", {"kid": "for-encryption"})
    assert_unauthorized(create(client, auth(enc)), INVALID)


async def test_concurrent_first_requests_share_one_fetch(
    start_jwks: Callable[..., JwksServer], keys: Keys
) -> None:
    server = start_jwks(keys.published)
    cache = JwksCache(server.base_url + JWKS_PATH, refetch_interval=30)

    found = await asyncio.gather(*(cache.get(k.kid) for k in keys.published * 5))
    assert all(f is not None for f in found)
    assert server.requests == 1


# -- a JWKS server that is down or misbehaves is a 401, never a 500 -------------------


def assert_unavailable(response: Any) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"


def test_jwks_server_down_gives_503(make_client: Callable[..., TestClient], keys: Keys) -> None:
    client = make_client(jwks_url=_closed_port_url() + JWKS_PATH)
    assert_unavailable(create(client, auth(keys.ed.token(claims()))))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(503, b'{"error": "down"}', id="http-503"),
        pytest.param(200, b"<html>maintenance</html>", id="not-json"),
        pytest.param(200, b'["not", "a", "key", "set"]', id="json-without-keys"),
    ],
)
def test_misbehaving_jwks_server_gives_503(
    start_jwks: Callable[..., JwksServer],
    make_client: Callable[..., TestClient],
    keys: Keys,
    status: int,
    body: bytes,
) -> None:
    server = start_jwks(keys.published, status=status, body=body)
    client = make_client(better_auth_url=server.base_url)
    assert_unavailable(create(client, auth(keys.ed.token(claims()))))
    assert server.requests == 1  # the start-up fetch; the request does not hammer it


def test_recovers_when_the_jwks_server_comes_back(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks(keys.published, status=503, body=b"{}")
    client = make_client(better_auth_url=server.base_url, jwks_refetch_interval=0.3)
    token = keys.ed.token(claims())
    assert_unavailable(create(client, auth(token)))
    assert_unavailable(create(client, auth(token)))
    assert server.requests == 1  # an outage is not hammered

    server.status, server.body = 200, None
    time.sleep(0.35)
    assert create(client, auth(token)).status_code == 201
    assert server.requests == 2


def test_failed_refetch_keeps_the_keys_already_known(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks(keys.published)
    client = make_client(better_auth_url=server.base_url, jwks_refetch_interval=0)
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201

    server.status, server.body = 500, b"oops"
    # A kid the key set lacks cannot be checked while the key server fails: 503.
    assert_unavailable(create(client, auth(keys.stranger.token(claims()))))
    assert server.requests == 2
    assert create(client, auth(keys.es.token(claims()))).status_code == 201


# -- HS256 with BETTER_AUTH_SECRET -----------------------------------------------------


def test_shared_secret_token_works_alongside_jwks_without_fetching(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks(keys.published)
    client = make_client(better_auth_url=server.base_url, better_auth_secret=TEST_SECRET)
    user = new_user()

    deadline = time.monotonic() + 5
    while server.requests == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the start-up fetch, in the background
    fetched = server.requests
    response = create(client, bearer(user))
    assert response.status_code == 201
    assert response.json()["data"]["user_id"] == user
    assert server.requests == fetched  # an HS256 token needs no key set

    task_id = response.json()["data"]["id"]
    deleted = client.delete(f"/api/tasks/{task_id}", headers=auth(keys.ed.token(claims(user))))
    assert deleted.status_code == 204
    assert server.requests == fetched  # its key was fetched at start-up


def test_shared_secret_token_is_refused_when_only_jwks_is_configured(
    jwks_client: TestClient,
) -> None:
    assert_unauthorized(create(jwks_client, bearer(new_user())), INVALID)


def test_shared_secret_only_refuses_asymmetric_tokens(
    make_client: Callable[..., TestClient], keys: Keys
) -> None:
    client = make_client(better_auth_secret=TEST_SECRET)
    assert create(client, bearer(new_user())).status_code == 201
    assert_unauthorized(create(client, auth(keys.ed.token(claims()))), INVALID)


def test_token_signed_with_another_secret_is_refused(both_client: TestClient) -> None:
    forged = jwt.encode(claims(), "another-secret-0123456789-abcdefghijklmnop", "HS256")
    assert_unauthorized(create(both_client, auth(forged)), INVALID)


def test_expired_shared_secret_token_says_expired(both_client: TestClient) -> None:
    assert_unauthorized(create(both_client, bearer(new_user(), ttl_seconds=-60)), EXPIRED)


def test_a_key_removed_from_the_jwks_stops_verifying_within_max_age(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    revoked = new_ed25519()
    server = start_jwks([revoked, keys.ed])
    client = make_client(better_auth_url=server.base_url, jwks_max_age=1.0)
    assert create(client, auth(revoked.token(claims()))).status_code == 201
    with server._lock:
        server.keys[:] = [keys.ed.jwk]  # the key server revokes the key
    removed = time.monotonic()
    while create(client, auth(revoked.token(claims()))).status_code == 201:
        assert time.monotonic() - removed < 1.5, "the revoked key still verifies"
        time.sleep(0.05)
    assert_unauthorized(create(client, auth(revoked.token(claims()))), INVALID)
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201


def test_known_keys_keep_working_when_the_refetch_after_max_age_fails(
    start_jwks: Callable[..., JwksServer], make_client: Callable[..., TestClient], keys: Keys
) -> None:
    server = start_jwks([keys.ed])
    client = make_client(better_auth_url=server.base_url, jwks_max_age=1.0)
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201
    server.status = 503
    time.sleep(1.6)  # past max_age: every refetch since has failed
    assert server.requests >= 2
    assert create(client, auth(keys.ed.token(claims()))).status_code == 201
