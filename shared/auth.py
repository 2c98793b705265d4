"""JWT verification shared by both APIs.

Two ways to verify, by configuration: HS256 with ``BETTER_AUTH_SECRET``, and the public
keys a Better Auth server publishes at ``{BETTER_AUTH_URL}/api/auth/jwks`` (EdDSA by
default; ES256, RS256 or PS256 when so configured). The key set is fetched once,
cached, and refetched only for an unknown ``kid``, at most once per
``JWKS_REFETCH_INTERVAL`` seconds. Algorithms are fixed per key: ``alg: none`` and an
HS256 token signed with a public key never verify.

A browser sends the same token with every request until it expires, so a verified
token is remembered (bounded, in memory): the next request with it skips the signature
check and the claim parsing but still checks the expiry (and not-before) against the
clock, and, for a JWKS key, that the key is still the one the server publishes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request

from shared.errors import Unauthorized
from shared.settings import Settings

log = logging.getLogger("taskservice.auth")

MISSING = "Authorization header required"
EXPIRED = "Token expired"
INVALID = "Invalid token"

ASYMMETRIC_ALGORITHMS = frozenset({"EdDSA", "ES256", "RS256", "PS256"})
MAX_SUBJECT_LENGTH = 255
MAX_JWKS_BYTES = 1_000_000


def allowed_algorithms(data: dict[str, Any]) -> frozenset[str]:
    """The JWS algorithms a published public key may verify: fixed by its type and
    curve, and narrowed to its declared ``alg`` when it has one."""
    kty, crv = data.get("kty"), data.get("crv")
    if kty == "OKP":
        by_type = frozenset({"EdDSA"}) if crv in ("Ed25519", "Ed448") else frozenset()
    elif kty == "EC":
        by_type = frozenset({"ES256"}) if crv == "P-256" else frozenset()
    elif kty == "RSA":
        by_type = frozenset({"RS256", "PS256"})
    else:
        by_type = frozenset()
    declared = data.get("alg")
    if declared is None:
        return by_type
    return by_type & {declared} if isinstance(declared, str) else frozenset()


def parse_jwks(document: Any) -> dict[str | None, tuple[jwt.PyJWK, frozenset[str]]]:
    """The usable signing keys of a JWKS document by ``kid``; anything else is skipped,
    so one odd entry never hides the good keys."""
    keys: dict[str | None, tuple[jwt.PyJWK, frozenset[str]]] = {}
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("JWKS document has no 'keys' list")
    for data in entries:
        if not isinstance(data, dict):
            continue
        kid = data.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        if data.get("use", "sig") != "sig":
            continue
        algorithms = allowed_algorithms(data)
        if not algorithms:
            continue
        try:
            key = jwt.PyJWK(data)
        except Exception as e:  # PyJWK raises more than PyJWTError
            log.warning("skipping unusable JWKS key %r: %s", kid, e)
            continue
        keys[kid] = (key, algorithms)
    return keys


class JwksCache:
    """The key set of a Better Auth server: fetched on first use, cached, and refetched
    only for an unknown ``kid``, at most once per ``refetch_interval`` seconds (a failed
    fetch counts too, so a key server outage is not hammered)."""

    def __init__(
        self, url: str, refetch_interval: float, timeout: float = 5.0, max_age: float = 900.0
    ) -> None:
        self.url = url
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        # Keys older than this are fetched again on next use, so a key the server has
        # removed (revoked) stops verifying within max_age even if no new kid shows up.
        self.max_age = max_age
        self._keys: dict[str | None, tuple[jwt.PyJWK, frozenset[str]]] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    def _fetch(self) -> dict[str | None, tuple[jwt.PyJWK, frozenset[str]]]:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return parse_jwks(json.loads(response.read(MAX_JWKS_BYTES)))

    def _expired(self) -> bool:
        return bool(self._keys) and time.monotonic() - self._fetched_at >= self.max_age

    async def get(self, kid: str | None) -> tuple[jwt.PyJWK, frozenset[str]] | None:
        """The key for ``kid`` and the algorithms it may verify, or None."""
        if kid in self._keys and not self._expired():
            return self._keys[kid]
        async with self._lock:
            expired = self._expired()
            if kid in self._keys and not expired:
                return self._keys[kid]
            if not expired and time.monotonic() - self._fetched_at < self.refetch_interval:
                return None
            self._fetched_at = time.monotonic()
            try:
                self._keys = await asyncio.to_thread(self._fetch)
            except Exception as e:  # a key server outage is an auth failure
                # Known keys stay usable while the key server is down.
                log.warning("could not fetch JWKS from %s: %s", self.url, e)
        return self._keys.get(kid)


@dataclass(frozen=True, slots=True)
class _Verified:
    sub: str
    exp: float
    nbf: float | None
    kid: str | None
    key: Any  # the JWKS key object it verified with; None for HS256


class Authenticator:
    CACHE_SIZE = 10_000

    def __init__(self, settings: Settings) -> None:
        self.secret = settings.better_auth_secret
        url = settings.effective_jwks_url
        self.jwks = (
            JwksCache(url, settings.jwks_refetch_interval, max_age=settings.jwks_max_age)
            if url
            else None
        )
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway
        self.max_token_bytes = settings.max_token_bytes
        self._verified: OrderedDict[str, _Verified] = OrderedDict()

    async def user_id(self, authorization: str | None) -> str:
        if not authorization:
            raise Unauthorized(MISSING)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized(MISSING)
        token = token.strip()
        if not token or len(token) > self.max_token_bytes:
            raise Unauthorized(INVALID)
        known = self._verified.get(token)
        if known is not None and await self._still_valid(token, known):
            return known.sub
        return await self._verify(token)

    async def _still_valid(self, token: str, known: _Verified) -> bool:
        now = time.time()
        if now >= known.exp + self.leeway:  # PyJWT's rule
            self._verified.pop(token, None)
            raise Unauthorized(EXPIRED)
        if known.nbf is not None and now < known.nbf - self.leeway:
            return False  # verify afresh: PyJWT says why
        if known.key is not None:
            assert self.jwks is not None
            found = await self.jwks.get(known.kid)
            if found is None or found[0] is not known.key:
                # The key was refetched (or withdrawn): verify against what is published now.
                self._verified.pop(token, None)
                return False
        return True

    def _remember(self, token: str, verified: _Verified) -> None:
        self._verified[token] = verified
        if len(self._verified) > self.CACHE_SIZE:
            self._verified.popitem(last=False)

    async def _verify(self, token: str) -> str:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized(INVALID) from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise Unauthorized(INVALID)
        key: Any
        jwk: Any = None
        kid = None
        if alg == "HS256" and self.secret:
            key = self.secret
        elif alg in ASYMMETRIC_ALGORITHMS and self.jwks is not None:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise Unauthorized(INVALID)
            found = await self.jwks.get(kid)
            if found is None or alg not in found[1]:
                raise Unauthorized(INVALID)
            jwk, key = found[0], found[0].key
        else:
            raise Unauthorized(INVALID)
        options: dict[str, Any] = {"require": ["exp", "sub"]}
        if self.audience is None:
            options["verify_aud"] = False
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized(EXPIRED) from None
        except jwt.PyJWTError:
            raise Unauthorized(INVALID) from None
        sub = claims.get("sub")
        if not usable_subject(sub):
            raise Unauthorized(INVALID)
        # PyJWT takes any value int() accepts (a numeric string too); only numbers here.
        exp = numeric_date(claims["exp"])
        times = {name: numeric_date(claims[name]) for name in ("iat", "nbf") if name in claims}
        if exp is None or None in times.values():
            raise Unauthorized(INVALID)
        self._remember(token, _Verified(sub, exp, times.get("nbf"), kid, jwk))
        return sub


def usable_subject(sub: Any) -> bool:
    """Whether `sub` can be a user id: a non-blank string of at most
    MAX_SUBJECT_LENGTH characters, no C0 control characters, valid Unicode (a lone
    surrogate, which JSON's \\u escapes can carry, has no UTF-8 form to store)."""
    if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_SUBJECT_LENGTH:
        return False
    if any(ord(c) < 32 for c in sub):
        return False
    try:
        sub.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def numeric_date(value: Any) -> float | None:
    """A NumericDate claim (RFC 7519: a JSON number of seconds) as a finite float;
    None for anything else: a string, a boolean, null, or a number out of float range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


async def current_user(request: Request) -> str:
    authenticator: Authenticator = request.app.state.authenticator
    user_id = await authenticator.user_id(request.headers.get("authorization"))
    request.state.user_id = user_id
    return user_id


CurrentUser = Annotated[str, Depends(current_user)]


def mint_token(
    secret: str,
    user_id: str,
    *,
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """A development HS256 token, the kind Better Auth's shared-secret setup issues."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
