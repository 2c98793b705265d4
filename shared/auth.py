"""JWT verification shared by both APIs.

Two ways to verify, by configuration: HS256 with ``BETTER_AUTH_SECRET``, and the public
keys a Better Auth server publishes at ``{BETTER_AUTH_URL}/api/auth/jwks`` (EdDSA by
default; ES256, RS256 or PS256 when so configured). The key set is fetched once,
cached, and refetched only for an unknown ``kid``, at most once per
``JWKS_REFETCH_INTERVAL`` seconds. Algorithms are fixed per key: ``alg: none`` and an
HS256 token signed with a public key never verify.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request

from shared.errors import Unauthorized
from shared.settings import Settings

log = logging.getLogger("taskservice.auth")

MISSING = "Authorization header required"
EXPIRED = "Token expired"
INVALID = "Invalid token"

# Which JWS algorithm a public key may verify, by key type (and curve).
ASYMMETRIC_ALGORITHMS = {"EdDSA", "ES256", "RS256", "PS256"}
MAX_SUBJECT_LENGTH = 255


def _allowed_algorithm(jwk: jwt.PyJWK) -> set[str]:
    kty = jwk.key_type
    if kty == "OKP":
        return {"EdDSA"}
    if kty == "EC":
        return {"ES256"} if jwk._jwk_data.get("crv", "P-256") == "P-256" else set()
    if kty == "RSA":
        declared = jwk._jwk_data.get("alg")
        return {declared} if declared in ("RS256", "PS256") else {"RS256", "PS256"}
    return set()


class JwksCache:
    """The key set of a Better Auth server: fetched lazily, refetched on unknown kid."""

    def __init__(self, url: str, refetch_interval: float, timeout: float = 5.0) -> None:
        self.url = url
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        with urllib.request.urlopen(self.url, timeout=self.timeout) as response:  # noqa: S310
            document = json.loads(response.read(1_000_000))
        keys: dict[str | None, jwt.PyJWK] = {}
        for data in document.get("keys", []):
            try:
                key = jwt.PyJWK(data)
            except jwt.PyJWTError as e:
                log.warning("skipping unusable JWKS key %s: %s", data.get("kid"), e)
                continue
            keys[data.get("kid")] = key
        return keys

    async def get(self, kid: str | None) -> jwt.PyJWK | None:
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if kid in self._keys:
                return self._keys[kid]
            if time.monotonic() - self._fetched_at < self.refetch_interval:
                return None
            self._fetched_at = time.monotonic()
            try:
                self._keys = await asyncio.to_thread(self._fetch)
            except Exception as e:  # noqa: BLE001 - a key server outage is an auth failure
                log.warning("could not fetch JWKS from %s: %s", self.url, e)
                return None
        return self._keys.get(kid)


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.secret = settings.better_auth_secret
        url = settings.effective_jwks_url
        self.jwks = JwksCache(url, settings.jwks_refetch_interval) if url else None
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway
        self.max_token_bytes = settings.max_token_bytes

    async def user_id(self, authorization: str | None) -> str:
        if not authorization:
            raise Unauthorized(MISSING)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise Unauthorized(MISSING)
        token = token.strip()
        if not token or len(token) > self.max_token_bytes:
            raise Unauthorized(INVALID)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized(INVALID) from None
        alg = header.get("alg")
        key: Any
        if alg == "HS256" and self.secret:
            key = self.secret
        elif alg in ASYMMETRIC_ALGORITHMS and self.jwks is not None:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise Unauthorized(INVALID)
            jwk = await self.jwks.get(kid)
            if jwk is None or alg not in _allowed_algorithm(jwk):
                raise Unauthorized(INVALID)
            key = jwk.key
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
        if (
            not isinstance(sub, str)
            or not sub.strip()
            or len(sub) > MAX_SUBJECT_LENGTH
            or any(ord(c) < 32 for c in sub)
        ):
            raise Unauthorized(INVALID)
        return sub


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
