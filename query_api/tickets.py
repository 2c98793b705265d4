"""Stream tickets: how a browser's `EventSource` authenticates to the live stream.

`EventSource` cannot send an `Authorization` header (its constructor takes a URL and
`withCredentials`, nothing else), and a JWT in the URL would be written to access logs,
proxies' logs and the browser's history for as long as the token lives. So the page
first POSTs, with its bearer token, for a ticket (`POST /api/tasks/stream/tickets`), and
opens `EventSource(".../api/tasks/stream?ticket=...")`. A ticket:

- is sealed (AES-256-GCM): its user, the token's expiry and its own are neither readable
  nor changeable by anyone without the key; a ticket the service did not issue is a 401;
- is good for ONE connection within `TICKET_SECONDS` (60) of its issue: the process
  that redeems it remembers it until it expires and refuses it again (401);
- ends its stream when the token it was bought with expires (an `end` event says so).

Its key is STREAM_TICKET_SECRET, else derived from BETTER_AUTH_SECRET (HKDF, its own
label, so a ticket key is never a token key), else random per process. Every replica of
the query API with the same key accepts the others' tickets; single use is per process
(each remembers what it redeemed), so behind several replicas a stolen ticket could be
used once on each of them within its minute (docs/streams.md, "Auth").

A client that can send headers (`fetch` with a ReadableStream, the `@microsoft/fetch-event-
source` package, a server) needs no ticket: it sends `Authorization: Bearer <JWT>` on the
stream request itself, and `Last-Event-ID` when it reconnects.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.errors import ServiceUnavailable, Unauthorized
from shared.settings import Settings

log = logging.getLogger("taskservice.query_api.tickets")

TICKET_SECONDS = 60.0
_PREFIX = "st1."
_NONCE_BYTES = 12
_MAX_TICKET_CHARS = 2048
# How many redeemed, unexpired tickets a process remembers at most (each for at most a
# minute): past it, redeeming waits for some to expire (503), never forgets one early.
_MAX_REMEMBERED = 100_000
INVALID_TICKET = "Invalid or expired stream ticket"
USED_TICKET = "Stream ticket already used"


@dataclass(frozen=True, slots=True)
class Ticket:
    user_id: str
    token_expires: float  # the token's `exp`: the stream ends then
    expires: float  # the ticket's own: a connection must start before it


def ticket_key(settings: Settings) -> bytes:
    """The 32-byte ticket key (see the module)."""
    if settings.stream_ticket_secret:
        secret = settings.stream_ticket_secret
        if settings.environment == "production" and len(secret) < 32:
            raise ValueError("STREAM_TICKET_SECRET must be at least 32 characters"
                             " (openssl rand -base64 48)")
        return _hkdf(secret.encode(), b"taskservice stream tickets v1 (STREAM_TICKET_SECRET)")
    if settings.better_auth_secret:
        return _hkdf(settings.better_auth_secret.encode(), b"taskservice stream tickets v1")
    log.warning("neither STREAM_TICKET_SECRET nor BETTER_AUTH_SECRET is set: stream tickets"
                " use a random key of this process, so behind several query-API replicas a"
                " ticket works only on the one that issued it")
    return os.urandom(32)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) with no salt, 32 bytes: one block."""
    prk = hmac.new(b"\x00" * 32, secret, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


class Tickets:
    """Issues and redeems the tickets of one process."""

    def __init__(self, key: bytes, *, seconds: float = TICKET_SECONDS) -> None:
        self._aead = AESGCM(key)
        self.seconds = seconds
        self._redeemed: dict[bytes, float] = {}  # nonce -> the ticket's expiry

    def issue(self, user_id: str, token_expires: float) -> tuple[str, float]:
        """A ticket for `user_id`, and when it expires (epoch seconds): `seconds` from
        now, never after the token."""
        expires = min(time.time() + self.seconds, token_expires)
        nonce = os.urandom(_NONCE_BYTES)
        body = orjson.dumps({"u": user_id, "t": token_expires, "e": expires})
        sealed = self._aead.encrypt(nonce, body, _PREFIX.encode())
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode(), expires

    def redeem(self, text: str) -> Ticket:
        """The ticket's contents, once; else 401 (not ours, expired, or used)."""
        ticket, nonce = self._open(text)
        now = time.time()
        if now >= ticket.expires or now >= ticket.token_expires:
            raise Unauthorized(INVALID_TICKET)
        self._forget_expired(now)
        if nonce in self._redeemed:
            raise Unauthorized(USED_TICKET)
        if len(self._redeemed) >= _MAX_REMEMBERED:
            raise ServiceUnavailable("Too many stream tickets redeemed, try again shortly")
        self._redeemed[nonce] = ticket.expires
        return ticket

    def _open(self, text: str) -> tuple[Ticket, bytes]:
        if not text.startswith(_PREFIX) or len(text) > _MAX_TICKET_CHARS:
            raise Unauthorized(INVALID_TICKET)
        raw = text[len(_PREFIX):]
        try:
            blob = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            nonce, sealed = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
            fields = orjson.loads(self._aead.decrypt(nonce, sealed, _PREFIX.encode()))
            ticket = Ticket(str(fields["u"]), float(fields["t"]), float(fields["e"]))
        except (ValueError, TypeError, KeyError, InvalidTag, orjson.JSONDecodeError):
            raise Unauthorized(INVALID_TICKET) from None
        return ticket, nonce

    def _forget_expired(self, now: float) -> None:
        # Insertion order is nearly expiry order (every ticket lives `seconds`).
        while self._redeemed:
            nonce, expires = next(iter(self._redeemed.items()))
            if expires > now:
                break
            del self._redeemed[nonce]
