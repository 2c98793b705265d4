"""Better Auth session tokens as bearer tokens (AUTH_SESSION_TOKENS=also|only): the token
its `bearer()` plugin hands out (`set-auth-token`), which is no JWT, checked by asking
Better Auth's get-session with it.

One call per token not seen before (concurrent requests with one token share it, and
at most `MAX_CALLS` run at once per process); the answer is kept per token for
AUTH_SESSION_CACHE_SECONDS and never past the session's own `expiresAt`, so a session
ended at Better Auth (sign-out, revocation) is still accepted for up to that long. A
get-session that does not answer (or answers anything but 200) is an outage: the
caller answers 503, never 401. The trade-off against the `jwt()` plugin's tokens,
which the service verifies without a call: docs/better-auth.md."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.jwks import describe, fetch_document

MAX_CALLS = 16
CACHE_SIZE = 10_000
MAX_ANSWER_BYTES = 1_000_000


class SessionUnavailable(Exception):
    """get-session could not be asked; the message says why."""


@dataclass(frozen=True, slots=True)
class Session:
    """get-session's answer for one token: the user (None: no such session) and until
    when the answer may be used (a wall-clock time)."""

    user_id: str | None
    expires_at: float  # the session's end (inf when unknown); for None, when to ask again
    kept_until: float
    detail: str = ""


def _session_end(session: Any) -> float | None:
    value = session.get("expiresAt") if isinstance(session, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def looks_like_jwt(token: str) -> bool:
    """Three base64url segments, the first one a JSON object's (`eyJ`): a JWT; a Better
    Auth session token is `token.signature`, two segments."""
    return token.count(".") == 2 and token.startswith("eyJ")


class SessionTokens:
    def __init__(self, url: str, cache_seconds: float, timeout: float) -> None:
        self.url = url
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.calls = 0
        self._known: OrderedDict[str, Session] = OrderedDict()
        self._asking: dict[str, asyncio.Future[Session]] = {}
        self._slots = asyncio.Semaphore(MAX_CALLS)

    async def lookup(self, token: str) -> Session:
        """The session of `token`, from the cache or get-session; SessionUnavailable when
        get-session cannot be asked."""
        now = time.time()
        known = self._known.get(token)
        if known is not None and now < known.kept_until:
            return known
        task = self._asking.get(token)
        if task is None:  # one call per token, whoever asks meanwhile
            task = asyncio.ensure_future(self._ask(token))
            self._asking[token] = task
            task.add_done_callback(lambda done: self._settled(token, done))
        return await asyncio.shield(task)

    def _settled(self, token: str, task: asyncio.Future[Session]) -> None:
        self._asking.pop(token, None)
        if not task.cancelled() and task.exception() is None:
            self._remember(token, task.result())

    def _remember(self, token: str, answer: Session) -> None:
        self._known[token] = answer
        self._known.move_to_end(token)
        while len(self._known) > CACHE_SIZE:
            self._known.popitem(last=False)

    async def _ask(self, token: str) -> Session:
        async with self._slots:
            self.calls += 1
            started = time.time()
            try:
                document = await fetch_document(
                    self.url + "?disableRefresh=true", self.timeout, MAX_ANSWER_BYTES,
                    headers={"Authorization": f"Bearer {token}"}, server="get-session")
            except Exception as e:  # noqa: BLE001 - every failure: get-session is unavailable
                raise SessionUnavailable(
                    f"could not ask {self.url}: {describe(e, self.timeout)}") from None
        keep = started + self.cache_seconds
        if document is None:
            return Session(None, -math.inf, keep, "Better Auth's get-session knows no"
                                                  " session for this token (signed out, expired"
                                                  " or not its token; or the Better Auth server"
                                                  " lacks the bearer() plugin, without which"
                                                  " get-session ignores Authorization)")
        user = document.get("user") if isinstance(document, dict) else None
        user_id = user.get("id") if isinstance(user, dict) else None
        if not isinstance(user_id, str):
            raise SessionUnavailable(f"{self.url} answered no user id: is it Better Auth's"
                                     " get-session?")
        end = _session_end(document.get("session"))
        end = math.inf if end is None else end
        return Session(user_id, end, min(keep, end))
