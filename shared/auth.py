"""Bearer-token verification shared by both APIs.

Two ways to verify, by configuration: the public keys a Better Auth server publishes
(its `jwt()` plugin: `{BETTER_AUTH_URL}/api/auth/jwks`, EdDSA by default; ES256, ES512,
RS256 or PS256 when so configured), kept by `shared.jwks.JwksCache`; and HS256 with
``BETTER_AUTH_SECRET``, only when it is set (development tokens from `taskctl token`:
Better Auth's jwt() plugin never signs HS256). Algorithms are fixed per key: ``alg:
none`` and an HS256 token signed with a public key never verify.

Every refusal has a reason (`REASONS`): the answer stays one of three safe messages
(401), or 503 SERVICE_UNAVAILABLE with Retry-After when the key set cannot be fetched
(an outage of the key server is not a bad token); the reason and what was expected
are logged (at most one line per reason every `LOG_EVERY` seconds, with the number
left out) and counted (`auth_refusals_total{reason}`). `Authenticator.check` runs the
same steps and reports each one, for `taskctl auth check`.

A browser sends the same token with every request until it expires, so a verified
token is remembered (bounded, in memory): the next request with it skips the signature
check and the claim parsing but still checks the expiry (and not-before) against the
clock, and, for a JWKS key, that the key is still the one the server publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import jwt
from fastapi import Depends, Request

from shared.errors import ApiError, ServiceUnavailable, Unauthorized
from shared.jwks import (
    ASYMMETRIC_ALGORITHMS,
    MAX_JWKS_BYTES,
    JwksCache,
    PublishedKey,
    allowed_algorithms,
    parse_jwks,
)
from shared.observability import AUTH_REFUSALS
from shared.sessions import SessionTokens, SessionUnavailable, looks_like_jwt
from shared.settings import Settings, normalise_claim_url

__all__ = [
    "ASYMMETRIC_ALGORITHMS", "MAX_JWKS_BYTES", "JwksCache", "allowed_algorithms", "parse_jwks",
    "Authenticator", "CurrentUser", "current_user", "mint_token",
]

log = logging.getLogger("taskservice.auth")

MISSING = "Authorization header required"
EXPIRED = "Token expired"
INVALID = "Invalid token"
UNAVAILABLE = "Authentication keys unavailable, try again shortly"
SESSIONS_UNAVAILABLE = "Sessions cannot be checked now, try again shortly"

# Why a token is refused: the label of auth_refusals_total, the `reason` of the log line.
REASONS = (
    "missing_header",  # no Authorization header, or not the Bearer scheme
    "too_large",  # longer than MAX_TOKEN_BYTES
    "malformed",  # not a JWT: its header cannot be read
    "algorithm",  # an algorithm not allowed (by the settings, or for its key)
    "unknown_kid",  # the key set has no key with the token's kid
    "keys_unavailable",  # no key set can be fetched: 503, not 401
    "signature",  # the signature does not verify
    "expired",
    "not_yet_valid",  # nbf in the future
    "issuer",  # iss is not JWT_ISSUER
    "audience",  # aud does not name JWT_AUDIENCE
    "claims",  # exp missing, a time claim not a number, sub unusable
    "token_type",  # a signed token of Better Auth's that is no API token (its cookie cache)
    "session",  # AUTH_SESSION_TOKENS: Better Auth's get-session knows no such session
    "session_unavailable",  # AUTH_SESSION_TOKENS: get-session cannot be asked: 503
)
_UNAVAILABLE = {"keys_unavailable": UNAVAILABLE, "session_unavailable": SESSIONS_UNAVAILABLE}
LOG_EVERY = 10.0
MAX_SUBJECT_LENGTH = 255
_QUIET_REASONS = frozenset({"missing_header", "expired"})  # everyday events: INFO


class Refused(Exception):
    """A token the service refuses: `reason` (one of REASONS) and `detail`, a sentence
    for the log (never the response) saying what was expected and which setting says so."""

    def __init__(self, reason: str, detail: str, *, retry_after: int = 1) -> None:
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after

    @property
    def message(self) -> str:
        if self.reason == "missing_header":
            return MISSING
        if self.reason == "expired":
            return EXPIRED
        return _UNAVAILABLE.get(self.reason, INVALID)

    def error(self) -> ApiError:
        if self.reason in _UNAVAILABLE:
            unavailable = ServiceUnavailable(self.message)
            unavailable.headers["Retry-After"] = str(self.retry_after)
            return unavailable
        return Unauthorized(self.message)


@dataclass(frozen=True, slots=True)
class Step:
    """One verification step of `Authenticator.check`: its name, whether it passed,
    and what it saw."""

    name: str
    ok: bool
    detail: str


class _Throttle:
    """At most one log line per key every `every` seconds; counts the rest."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None: stay quiet; else the number of lines left out since the last one."""
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self.every:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._left_out.pop(key, 0)


def _shown(value: Any) -> str:
    """An attacker-chosen claim, quoted and cut short for a log line."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def better_auth_base(settings: Settings) -> str | None:
    """The base URL Better Auth's jwt() plugin puts in `iss` and `aud` by default (its
    `baseURL`'s origin): from BETTER_AUTH_URL, else guessed from JWKS_URL's origin."""
    url = settings.better_auth_url or settings.jwks_url
    if not url:
        return None
    return normalise_claim_url(url, origin_only=True)


@dataclass(frozen=True, slots=True)
class _Verified:
    sub: str
    exp: float
    nbf: float | None
    kid: str | None
    key: PublishedKey | None  # the JWKS key it verified with; None for HS256


class Authenticator:
    CACHE_SIZE = 10_000

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.secret = settings.better_auth_secret
        mode = settings.auth_session_tokens
        # "only": a Better Auth without the jwt() plugin, so no key set (unless JWKS_URL).
        url = settings.effective_jwks_url if mode != "only" or settings.jwks_url else None
        session_url = settings.session_url
        self.sessions = (
            SessionTokens(session_url, settings.auth_session_cache_seconds,
                          settings.jwks_fetch_timeout)
            if session_url
            else None
        )
        self.jwks = (
            JwksCache(url, settings.jwks_refetch_interval, timeout=settings.jwks_fetch_timeout,
                      max_age=settings.jwks_max_age)
            if url
            else None
        )
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway
        self.max_token_bytes = settings.max_token_bytes
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._throttle = _Throttle(LOG_EVERY)
        self._refresher: asyncio.Task[None] | None = None
        self._started = False
        self.log_settings = {
            "jwks_url": url, "hs256": bool(self.secret), "jwt_issuer": self.issuer,
            "jwt_audience": self.audience, "jwt_leeway": self.leeway,
            "max_token_bytes": self.max_token_bytes, "auth_session_tokens": mode,
        }

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start fetching the key set in the background (a failure is not fatal: requests
        get 503 and /api/ready says why until a fetch works) and say what the settings
        leave unchecked."""
        if self._started:
            return  # one authenticator may serve two apps of one process (taskctl dev)
        self._started = True
        for advice in self.advice():
            log.warning("%s", advice, extra={"auth_settings": self.log_settings})
        if self.jwks is not None and self._refresher is None:
            self._refresher = asyncio.create_task(self.jwks.run(), name="jwks-refresh")

    async def close(self) -> None:
        self._started = False
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def advice(self) -> list[str]:
        """Sentences on settings that leave something unchecked (logged at start-up)."""
        out = []
        base = better_auth_base(self.settings)
        if self.jwks is not None and (self.issuer is None or self.audience is None):
            unset = " and ".join(n for n, v in (("JWT_ISSUER", self.issuer),
                                                ("JWT_AUDIENCE", self.audience)) if v is None)
            guess = f" (here {base})" if base else ""
            value = base or "BASE_URL"
            out.append(
                f"{unset} not set, so that claim of a token is not checked. Better Auth's"
                f" jwt() plugin puts its base URL{guess} in both iss and aud unless its"
                " jwt.issuer / jwt.audience options say otherwise: set"
                f" JWT_ISSUER={value} and JWT_AUDIENCE={value} to refuse tokens of any other"
                " issuer (docs/better-auth.md)")
        if self.secret and self.jwks is not None and self.settings.environment == "production":
            out.append(
                "BETTER_AUTH_SECRET is set beside the JWKS: HS256 tokens signed with it are"
                " accepted too. Better Auth's jwt() plugin never signs HS256; if this is your"
                " Better Auth's own secret, unset it here (docs/better-auth.md)")
        return out

    def problem(self) -> str | None:
        """Why no token can be checked now, in words safe for /api/ready's public answer
        (the log has the key server's error), or None."""
        if self.jwks is None or self.jwks.problem() is None:
            return None
        if not self.jwks.fetched:
            return ("no key set fetched yet from the key server (BETTER_AUTH_URL / JWKS_URL):"
                    " the log says why; `taskctl auth check` too")
        return "the key set has no usable key: `taskctl auth check` lists what was skipped"

    # -- the request path --------------------------------------------------------------

    async def user_id(self, authorization: str | None) -> str:
        try:
            return await self._user_id(authorization)
        except Refused as refused:
            self._record(refused)
            raise refused.error() from None

    def _record(self, refused: Refused) -> None:
        AUTH_REFUSALS.labels(refused.reason).inc()
        level = logging.INFO if refused.reason in _QUIET_REASONS else logging.WARNING
        if not log.isEnabledFor(level):
            return
        left_out = self._throttle.allow(refused.reason)
        if left_out is None:
            return
        more = (f" ({left_out} more refusals for this reason in the last {LOG_EVERY:g} s not"
                " logged)" if left_out else "")
        log.log(level, "token refused (%s): %s%s", refused.reason, refused.detail, more,
                extra={"reason": refused.reason, "left_out": left_out,
                       "auth_settings": self.log_settings})

    async def _user_id(self, authorization: str | None) -> str:
        token = self._bearer(authorization)
        if self.sessions is not None and not looks_like_jwt(token):
            return await self._session(token, None)
        known = self._verified.get(token)
        if known is not None and await self._still_valid(token, known):
            return known.sub
        return await self._verify(token, None)

    def _bearer(self, authorization: str | None) -> str:
        if not authorization:
            raise Refused("missing_header", "no Authorization header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            raise Refused("missing_header", f"the Authorization scheme is {_shown(scheme[:20])},"
                                            " not Bearer")
        token = token.strip()
        if not token:
            raise Refused("malformed", "an empty Bearer token")
        if len(token) > self.max_token_bytes:
            raise Refused(
                "too_large",
                f"the token is {len(token)} bytes, over MAX_TOKEN_BYTES={self.max_token_bytes}."
                " Better Auth's jwt() plugin puts the whole user in its tokens unless"
                " jwt.definePayload says otherwise (an image as a data: URL makes them large):"
                " define a small payload, or raise MAX_TOKEN_BYTES")
        return token

    async def _still_valid(self, token: str, known: _Verified) -> bool:
        now = time.time()
        if now >= known.exp + self.leeway:  # PyJWT's rule
            self._verified.pop(token, None)
            raise Refused("expired", f"the token expired {now - known.exp:.0f} s ago"
                                     f" (exp {_when(known.exp)}; JWT_LEEWAY={self.leeway:g})")
        if known.nbf is not None and now < known.nbf - self.leeway:
            return False  # verify afresh: the steps say why
        if known.key is not None:
            assert self.jwks is not None
            found = await self.jwks.lookup(known.kid)
            if found.key is not known.key:
                # The key was refetched (or withdrawn): verify against what is published now.
                self._verified.pop(token, None)
                return False
        return True

    def _remember(self, token: str, verified: _Verified) -> None:
        self._verified[token] = verified
        if len(self._verified) > self.CACHE_SIZE:
            self._verified.popitem(last=False)

    # -- the steps ---------------------------------------------------------------------

    async def check(self, authorization: str) -> tuple[list[Step], str | None, Refused | None]:
        """Every step of verifying `authorization` (a token, or "Bearer <token>"), as the
        service runs them, without the remembered tokens: the steps, the user id (when
        accepted), the refusal (when not)."""
        steps: list[Step] = []
        header = authorization if " " in authorization.strip() else f"Bearer {authorization}"
        try:
            token = self._bearer(header)
            steps.append(Step("size", True, f"{len(token)} bytes (MAX_TOKEN_BYTES="
                                            f"{self.max_token_bytes})"))
            if self.sessions is not None and not looks_like_jwt(token):
                steps.append(Step("format", True, "not a JWT: a session token, checked with"
                                                  f" {self.sessions.url} (AUTH_SESSION_TOKENS)"))
                sub = await self._session(token, steps)
            else:
                sub = await self._verify(token, steps)
        except Refused as refused:
            steps.append(Step(refused.reason, False, refused.detail))
            return steps, None, refused
        return steps, sub, None

    async def _verify(self, token: str, steps: list[Step] | None) -> str:
        def passed(name: str, detail: str) -> None:
            if steps is not None:
                steps.append(Step(name, True, detail))

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            hint = ""
            if token.count(".") == 1 and self.sessions is None:
                hint = ("; it looks like a Better Auth session token (its bearer() plugin's"
                        " set-auth-token): send its JWT (authClient.token()), or set"
                        " AUTH_SESSION_TOKENS")
            raise Refused("malformed", f"not a JWT ({e}){hint}") from None
        alg, kid = header.get("alg"), header.get("kid")
        passed("format", f"a JWT; header alg={_shown(alg)} kid={_shown(kid)}")
        key: Any
        published: PublishedKey | None = None
        if not isinstance(alg, str):
            raise Refused("algorithm", f"the header's alg is {_shown(alg)}, not a string")
        if alg == "HS256":
            if not self.secret:
                raise Refused(
                    "algorithm",
                    "an HS256 token, but BETTER_AUTH_SECRET is not set, so HS256 is off. Better"
                    " Auth's jwt() plugin never signs HS256 (it signs with its JWKS keys);"
                    " HS256 tokens come from `taskctl token`, or are Better Auth's session"
                    " cookie cache (`session_data`, signed with Better Auth's own secret),"
                    " which is no API token: send the jwt() plugin's token instead")
            key = self.secret
            passed("algorithm", "HS256 with BETTER_AUTH_SECRET")
        elif alg in ASYMMETRIC_ALGORITHMS:
            if self.jwks is None:
                raise Refused("algorithm", f"an {alg} token, but no key set is configured"
                                           " (set BETTER_AUTH_URL or JWKS_URL)")
            passed("algorithm", f"{alg} (allowed: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))})")
            found = await self.jwks.lookup(kid)
            if found.state == "unavailable":
                raise Refused("keys_unavailable", found.detail,
                              retry_after=self.jwks.retry_after())
            if found.key is None:
                raise Refused("unknown_kid", found.detail)
            published = found.key
            if alg not in published.algorithms:
                raise Refused("algorithm", f"kid {kid!r} is a {published.kind} key for"
                                           f" {'/'.join(sorted(published.algorithms))}, the"
                                           f" token says {alg}")
            key = published.jwk.key
            passed("key", f"kid {kid!r}: {published.kind}, fetched from {self.jwks.url}")
        else:
            allowed = sorted(ASYMMETRIC_ALGORITHMS | ({"HS256"} if self.secret else set()))
            raise Refused("algorithm", f"alg {_shown(alg)} is not allowed (allowed:"
                                       f" {', '.join(allowed)})")
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg],
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "verify_aud": False, "verify_iss": False, "verify_sub": False,
                         "verify_jti": False},
            )
        except jwt.InvalidSignatureError:
            raise Refused("signature", "the signature does not verify"
                          + (f" with kid {kid!r}" if published else " with BETTER_AUTH_SECRET")
                          ) from None
        except jwt.PyJWTError as e:
            raise Refused("malformed", f"the token cannot be decoded ({e})") from None
        passed("signature", "verifies")
        if _session_cache(header, claims):
            raise Refused("token_type", "Better Auth's session cookie cache (typ"
                                        f" {_shown(header.get('typ'))}, aud"
                                        f" {_shown(claims.get('aud'))}), not an API token:"
                                        " send the jwt() plugin's token (authClient.token(),"
                                        " GET /api/auth/token or the set-auth-jwt header)")
        sub = self._check_claims(claims, passed)
        exp = numeric_date(claims["exp"])
        assert exp is not None
        nbf = numeric_date(claims["nbf"]) if "nbf" in claims else None
        self._remember(token, _Verified(sub, exp, nbf, kid, published))
        return sub

    async def _session(self, token: str, steps: list[Step] | None) -> str:
        assert self.sessions is not None
        try:
            found = await self.sessions.lookup(token)
        except SessionUnavailable as e:
            raise Refused("session_unavailable", str(e)) from None
        if found.user_id is None:
            raise Refused("session", found.detail)
        now = time.time()
        if now >= found.expires_at:
            raise Refused("expired", f"the session ended {now - found.expires_at:.0f} s ago"
                                     f" ({_when(found.expires_at)})")
        if not usable_subject(found.user_id):
            raise Refused("claims", f"get-session's user id {_shown(found.user_id)} is not a"
                                    " user id")
        if steps is not None:
            ends = _when(found.expires_at) if math.isfinite(found.expires_at) else "unknown"
            steps.append(Step("session", True, f"user {found.user_id!r}; the session ends {ends};"
                                               f" the answer is kept until"
                                               f" {_when(found.kept_until)}"
                                               " (AUTH_SESSION_CACHE_SECONDS)"))
        return found.user_id

    def _check_claims(self, claims: dict[str, Any], passed: Any) -> str:
        now = time.time()
        for name in ("exp", "iat", "nbf"):
            if name in claims and numeric_date(claims[name]) is None:
                raise Refused("claims", f"{name} is {_shown(claims[name])}, not a number of"
                                        " seconds")
        if "exp" not in claims:
            raise Refused("claims", "the token has no exp claim")
        exp = numeric_date(claims["exp"])
        assert exp is not None
        if now >= exp + self.leeway:
            raise Refused("expired", f"the token expired {now - exp:.0f} s ago (exp {_when(exp)};"
                                     f" JWT_LEEWAY={self.leeway:g})")
        nbf = numeric_date(claims["nbf"]) if "nbf" in claims else None
        if nbf is not None and now < nbf - self.leeway:
            raise Refused("not_yet_valid", f"the token is valid only from {_when(nbf)}, in"
                                           f" {nbf - now:.0f} s (clocks apart? JWT_LEEWAY="
                                           f"{self.leeway:g})")
        passed("expiry", f"expires in {exp - now:.0f} s ({_when(exp)})")
        if self.issuer is not None:
            iss = claims.get("iss")
            if iss is None:
                raise Refused("issuer", f"no iss claim; JWT_ISSUER expects {self.issuer!r}")
            if not isinstance(iss, str) or normalise_claim_url(iss) != self.issuer:
                raise Refused("issuer", f"expected issuer {self.issuer!r} (JWT_ISSUER), got"
                                        f" {_shown(iss)}")
            passed("issuer", f"{iss!r} (JWT_ISSUER)")
        if self.audience is not None:
            aud = claims.get("aud")
            names = [aud] if isinstance(aud, str) else aud
            if aud is None:
                raise Refused("audience", f"no aud claim; JWT_AUDIENCE expects {self.audience!r}")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise Refused("audience", f"aud is {_shown(aud)}, not a string or a list of them")
            if self.audience not in (normalise_claim_url(n) for n in names):
                raise Refused("audience", f"expected audience {self.audience!r} (JWT_AUDIENCE),"
                                          f" got {_shown(aud)}")
            passed("audience", f"{_shown(aud)} names {self.audience!r} (JWT_AUDIENCE)")
        sub = claims.get("sub")
        if sub is None:
            raise Refused("claims", "the token has no sub claim")
        if not usable_subject(sub):
            raise Refused("claims", f"sub {_shown(sub)} is not a user id (a non-blank string"
                                    f" of at most {MAX_SUBJECT_LENGTH} characters, no control"
                                    " characters)")
        passed("subject", f"user {sub!r}")
        return sub


# What Better Auth writes into the JWT of its session cookie cache (`session_data`, with
# `session.cookieCache.strategy: "jwt"`; with `jwt({sessionCookieCache: true})` it is
# signed with the jwt() plugin's own keys, so it verifies like an API token).
SESSION_CACHE_AUDIENCE = "better-auth:session-cache"


def _session_cache(header: dict[str, Any], claims: dict[str, Any]) -> bool:
    typ, aud = header.get("typ"), claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    return ((isinstance(typ, str) and "session-cache" in typ.lower())
            or SESSION_CACHE_AUDIENCE in audiences)


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
    """A development HS256 token (`taskctl token`); Better Auth's jwt() plugin signs with
    its JWKS keys instead."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")
