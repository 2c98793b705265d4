"""The key set of a Better Auth server (its `jwt()` plugin's JWKS): fetched, parsed and
kept by `JwksCache`, which `shared.auth` asks for the key of a token's `kid`.

The rules, each bounded:

- Fetched at start-up (`run`, a background task; a failure is not fatal) and again
  before the keys are `max_age` old (at half of it), so requests rarely wait for one.
- A `kid` not in the key set fetches it again, at most once per `refetch_interval`
  seconds per process, whatever the number of unknown `kid`s: a request with a new
  `kid` waits for the next allowed fetch (at most `MAX_KID_WAIT` seconds) and a flood
  of random `kid`s costs the key server one request per interval.
- Each fetch has a total deadline (`timeout`: connecting, the headers and the body
  together), so a key server that trickles its answer is cut off, not waited for.
- A failed fetch keeps the last good keys: they verify on while the key server is down.
  A token whose key cannot be known (no key set yet, or an unknown `kid` while the key
  server fails) is "unavailable" (the APIs answer 503), never "unknown" (401).

The HTTP client is a small asyncio one (GET, HTTP/1.1, `Connection: close`,
Content-Length, chunked or until close, up to three redirects; TLS with the system's
CA certificates; no proxy), so the deadline cancels the whole fetch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import jwt

log = logging.getLogger("taskservice.auth")

# The JWS algorithms Better Auth's jwt() plugin signs with (its keyPairConfig.alg).
ASYMMETRIC_ALGORITHMS = frozenset({"EdDSA", "ES256", "ES512", "RS256", "PS256"})
SUPPORTED_KEYS = "OKP Ed25519/Ed448 (EdDSA), EC P-256 (ES256), EC P-521 (ES512), RSA (RS256, PS256)"
MAX_JWKS_BYTES = 1_000_000
# Longest a request with an unknown kid waits for the next allowed fetch; with a longer
# JWKS_REFETCH_INTERVAL it is refused until then instead.
MAX_KID_WAIT = 10.0
# Seconds between fetches while the key server fails (at least; JWKS_REFETCH_INTERVAL
# when longer), from the background task.
RETRY_AFTER_FAILURE = 1.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_EC_ALGORITHMS = {"P-256": "ES256", "P-521": "ES512"}


class KeyServerError(Exception):
    """The key set could not be fetched or read; the message says why, in words."""


def allowed_algorithms(data: dict[str, Any]) -> frozenset[str]:
    """The JWS algorithms a published public key may verify: fixed by its type and
    curve, and narrowed to its declared ``alg`` when it has one."""
    kty, crv = data.get("kty"), data.get("crv")
    if kty == "OKP":
        by_type = frozenset({"EdDSA"}) if crv in ("Ed25519", "Ed448") else frozenset()
    elif kty == "EC":
        by_type = frozenset({_EC_ALGORITHMS[crv]}) if crv in _EC_ALGORITHMS else frozenset()
    elif kty == "RSA":
        by_type = frozenset({"RS256", "PS256"})
    else:
        by_type = frozenset()
    declared = data.get("alg")
    if declared is None:
        return by_type
    return by_type & {declared} if isinstance(declared, str) else frozenset()


@dataclass(frozen=True, slots=True)
class PublishedKey:
    kid: str | None
    jwk: jwt.PyJWK
    algorithms: frozenset[str]
    kind: str  # "OKP Ed25519", "EC P-256", "RSA 2048"...
    raw: str  # the entry as canonical JSON: an unchanged key keeps its objects


def _kind(data: dict[str, Any], jwk: jwt.PyJWK) -> str:
    kty = data.get("kty")
    if kty == "RSA":
        size = getattr(jwk.key, "key_size", None)
        return f"RSA {size}" if size else "RSA"
    return f"{kty} {data.get('crv')}"


def read_jwks(document: Any) -> tuple[list[PublishedKey], list[str]]:
    """The usable signing keys of a JWKS document, and a sentence for each entry
    skipped (one odd entry never hides the good keys). No ``keys`` list: ValueError."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("the JWKS document has no 'keys' list")
    keys: list[PublishedKey] = []
    skipped: list[str] = []
    for number, data in enumerate(entries, 1):
        if not isinstance(data, dict):
            skipped.append(f"entry {number}: not a JSON object")
            continue
        kid = data.get("kid")
        name = f"kid {kid!r}" if isinstance(kid, str) else f"entry {number}"
        if kid is not None and not isinstance(kid, str):
            skipped.append(f"{name}: its kid is not a string")
            continue
        if data.get("use", "sig") != "sig":
            skipped.append(f"{name}: use {data.get('use')!r}, not a signing key")
            continue
        algorithms = allowed_algorithms(data)
        if not algorithms:
            what = f"{data.get('kty')} {data.get('crv') or ''}".strip()
            declared = f" declared for {data.get('alg')!r}" if "alg" in data else ""
            skipped.append(
                f"{name}: {what} key{declared}; this service verifies {SUPPORTED_KEYS}")
            continue
        try:
            jwk = jwt.PyJWK(data)
        except Exception as e:  # PyJWK raises more than PyJWTError
            skipped.append(f"{name}: unusable ({e})")
            continue
        raw = json.dumps(data, sort_keys=True, separators=(",", ":"))
        keys.append(PublishedKey(kid, jwk, algorithms, _kind(data, jwk), raw))
    return keys, skipped


def parse_jwks(document: Any) -> dict[str | None, tuple[jwt.PyJWK, frozenset[str]]]:
    """The usable signing keys of a JWKS document by ``kid``; anything else is skipped."""
    keys, _ = read_jwks(document)
    return {key.kid: (key.jwk, key.algorithms) for key in keys}


# -- the HTTP fetch, under one deadline ------------------------------------------------


def describe(error: BaseException, timeout: float) -> str:
    """Why a fetch failed, in words an operator can act on."""
    if isinstance(error, KeyServerError):
        return str(error)
    if isinstance(error, TimeoutError):
        return f"no complete answer within {timeout:g} s (JWKS_FETCH_TIMEOUT)"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the key server running, on that host and port?)"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name ({error.strerror or error})"
    if isinstance(error, ssl.SSLError):
        return f"TLS failed: {error.reason or error}"
    if isinstance(error, asyncio.IncompleteReadError):
        return "the key server closed the connection mid-answer"
    if isinstance(error, OSError):
        return f"{error.strerror or error}"
    if isinstance(error, ValueError):  # the document: read_jwks says what is wrong
        return str(error)
    return f"{type(error).__name__}: {error}"


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> bytes:
    too_large = KeyServerError(f"the answer is larger than {limit} bytes")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise KeyServerError("malformed chunked answer") from None
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return bytes(body)
            if len(body) + size > limit:
                raise too_large
            body += await reader.readexactly(size)
            await reader.readline()
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise KeyServerError("malformed Content-Length") from None
        if length > limit:
            raise too_large
        return await reader.readexactly(length)
    body = bytearray()
    while chunk := await reader.read(65_536):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _get_once(
    url: str, limit: int, extra: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise KeyServerError(f"{url!r} is not an http:// or https:// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    context = ssl.create_default_context() if parts.scheme == "https" else None
    reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=context)
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.netloc.rpartition("@")[2]
        lines = "".join(f"{name}: {value}\r\n" for name, value in (extra or {}).items())
        request = (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
                   f"User-Agent: taskservice\r\n{lines}Connection: close\r\n\r\n")
        if not request.isascii() or any("\r" in v or "\n" in v for v in (extra or {}).values()):
            raise KeyServerError("the URL is not ASCII: percent-encode it (IDNA for the host)")
        writer.write(request.encode("ascii"))
        await writer.drain()
        status_line = (await reader.readline()).decode("latin-1").split()
        if (len(status_line) < 2 or not status_line[0].startswith("HTTP/")
                or not status_line[1].isdigit()):
            raise KeyServerError("the answer is not HTTP")
        headers: dict[str, str] = {}
        for _ in range(200):
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise KeyServerError("too many header lines")
        return int(status_line[1]), headers, await _read_body(reader, headers, limit)
    finally:
        writer.transport.abort()  # Connection: close; never wait for a peer's goodbye


async def fetch_document(
    url: str, timeout: float, limit: int = MAX_JWKS_BYTES, *,
    headers: dict[str, str] | None = None, redirects: int = 3, server: str = "the key server",
) -> Any:
    """The JSON document at `url`, within `timeout` seconds in all (redirects included;
    a request with `headers` follows none, so they go to `url` alone)."""
    if headers:
        redirects = 0
    async with asyncio.timeout(timeout):
        for _ in range(redirects + 1):
            status, answer, body = await _get_once(url, limit, headers)
            if status in _REDIRECTS and answer.get("location") and redirects:
                url = urljoin(url, answer["location"])
                continue
            if status != 200:
                raise KeyServerError(f"HTTP {status} from {server}")
            try:
                return json.loads(body)
            except ValueError:
                raise KeyServerError("the answer is not JSON") from None
        raise KeyServerError(f"more than {redirects} redirects")


# -- the cache ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer for one kid: its key, or why not ("unknown": the current key set has
    no such key; "unavailable": no key set can be had now)."""

    key: PublishedKey | None
    state: str  # "found", "unknown", "unavailable"
    detail: str = ""


@dataclass
class FetchRecord:
    ok: bool
    seconds: float
    error: str | None = None


class JwksCache:
    def __init__(
        self, url: str, refetch_interval: float = 5.0, timeout: float = 5.0,
        max_age: float = 900.0,
    ) -> None:
        self.url = url
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        # Keys older than this are fetched again before use, so a key the server has
        # removed (revoked) stops verifying within max_age even if no new kid shows up.
        self.max_age = max_age
        self.fetches = 0  # attempts, failed ones included
        self.last_fetch: FetchRecord | None = None
        self.skipped: list[str] = []
        self._keys: dict[str | None, PublishedKey] | None = None  # None: never fetched
        self._fetched_at = -math.inf  # monotonic start of the last good fetch
        self._attempted_at = -math.inf  # monotonic start of the last attempt
        self._error: str | None = None  # why the last attempt failed; None if it did not
        self._lock = asyncio.Lock()

    # -- state, for /api/ready and `taskctl auth check` --

    @property
    def keys(self) -> dict[str | None, PublishedKey]:
        return dict(self._keys or {})

    @property
    def fetched(self) -> bool:
        return self._keys is not None

    @property
    def error(self) -> str | None:
        return self._error

    def age(self) -> float | None:
        return time.monotonic() - self._fetched_at if self._keys is not None else None

    def problem(self) -> str | None:
        """Why no token can be checked now (no key set fetched yet, or one without a
        usable key), or None."""
        if self._keys is None:
            why = f": {self._error}" if self._error else " (the first fetch is under way)"
            return f"no key set fetched yet from {self.url}{why}"
        if not self._keys:
            return f"the key set at {self.url} has no usable key"
        return None

    def retry_after(self) -> int:
        """Whole seconds until the next fetch may run (at least 1), for Retry-After."""
        pause = max(self.refetch_interval, RETRY_AFTER_FAILURE)
        return max(1, math.ceil(self._attempted_at + pause - time.monotonic()))

    # -- fetching --

    async def _fetch_locked(self) -> bool:
        started = self._attempted_at = time.monotonic()
        self.fetches += 1
        try:
            keys, skipped = read_jwks(await fetch_document(self.url, self.timeout))
        except Exception as e:  # every failure is "could not fetch": the reason is logged
            self._error = describe(e, self.timeout)
            self.last_fetch = FetchRecord(False, time.monotonic() - started, self._error)
            age = time.monotonic() - self._fetched_at
            kept = (f"the {len(self._keys)} key(s) fetched {age:.0f} s ago keep verifying"
                    if self._keys else "no key set yet: tokens get 503")
            log.warning("could not fetch the JWKS from %s: %s; %s", self.url, self._error, kept,
                        extra={"jwks_url": self.url, "reason": "jwks_fetch_failed"})
            return False
        previous = self._keys or {}
        fresh: dict[str | None, PublishedKey] = {}
        for key in keys:
            old = previous.get(key.kid)
            fresh[key.kid] = old if old is not None and old.raw == key.raw else key
        if fresh.keys() != previous.keys() or skipped != self.skipped or self._error:
            log.info("JWKS from %s: %d usable key(s) (%s)%s", self.url, len(fresh),
                     ", ".join(f"{k.kid}: {'/'.join(sorted(k.algorithms))}" for k in fresh.values())
                     or "none", f"; skipped {'; '.join(skipped)}" if skipped else "",
                     extra={"jwks_url": self.url})
        self._keys, self.skipped, self._error = fresh, skipped, None
        self._fetched_at = started
        self.last_fetch = FetchRecord(True, time.monotonic() - started)
        return True

    async def refresh(self) -> bool:
        """Fetch the key set now (one fetch at a time); whether it worked."""
        async with self._lock:
            return await self._fetch_locked()

    async def run(self) -> None:
        """The background task: fetch now, then before the keys are max_age / 2 old;
        after a failure, every max(1 s, refetch_interval)."""
        while True:
            if self._keys is None or self._error is not None:
                due = self._attempted_at + max(RETRY_AFTER_FAILURE, self.refetch_interval)
            else:
                due = self._fetched_at + self.max_age / 2
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self.refresh()

    # -- the lookup --

    async def get(self, kid: str | None) -> tuple[jwt.PyJWK, frozenset[str]] | None:
        """The key for ``kid`` and the algorithms it may verify, or None."""
        found = (await self.lookup(kid)).key
        return None if found is None else (found.jwk, found.algorithms)

    async def lookup(self, kid: str | None) -> Lookup:
        keys = self._keys
        arrived = time.monotonic()
        if keys is not None and kid in keys and arrived - self._fetched_at < self.max_age:
            return Lookup(keys[kid], "found")
        async with self._lock:
            while True:
                keys, now = self._keys, time.monotonic()
                known = keys.get(kid) if keys is not None else None
                if known is not None and now - self._fetched_at < self.max_age:
                    return Lookup(known, "found")
                if self._attempted_at >= arrived:  # a fetch began since we came: its answer
                    if self._error is None:
                        return Lookup(known, "found") if known else self._unknown(kid, now)
                    return self._unavailable(known)
                wait = self._attempted_at + self.refetch_interval - now
                if wait > 0:
                    if self._error is not None:  # the key server failed moments ago
                        return self._unavailable(known)
                    if known is not None:
                        return Lookup(known, "found")
                    if wait > MAX_KID_WAIT:
                        return self._unknown(kid, now)
                    await asyncio.sleep(wait)  # the key may be brand new: the next fetch
                    continue
                await self._fetch_locked()

    def _unknown(self, kid: str | None, now: float) -> Lookup:
        keys = self._keys or {}
        listed = ", ".join(repr(k) for k in keys) or "none"
        detail = (f"kid {kid!r} is not in the key set fetched {now - self._fetched_at:.1f} s ago"
                  f" from {self.url} (kids: {listed})")
        wait = self._attempted_at + self.refetch_interval - now
        if wait > 0:
            detail += (f"; the next fetch for an unknown kid is allowed in {wait:.1f} s"
                       " (JWKS_REFETCH_INTERVAL)")
        return Lookup(None, "unknown", detail)

    def _unavailable(self, known: PublishedKey | None) -> Lookup:
        if known is not None:  # the last good keys verify on while the server is down
            return Lookup(known, "found")
        if self._keys is None:
            return Lookup(None, "unavailable",
                          f"no key set fetched yet from {self.url}: {self._error}")
        age = time.monotonic() - self._fetched_at
        return Lookup(None, "unavailable", f"the kid is not in the key set fetched {age:.0f} s"
                                           f" ago and the key server fails: {self._error}")
