"""`taskctl auth check [--token T]`: what the APIs' token check sees, in one command.

It prints the auth settings (mode, issuer, audience, limits), fetches the key set as
the APIs do (same client, same deadline) and says whether the key server answers, how
fast and with which keys, then, for a token, runs the service's own verification steps
(`shared.auth.Authenticator.check`) and shows each one and where it fails. Exit status:
0 when all is well (the token accepted); 1 when the service would refuse the token, or,
without one, when the key server fails or publishes no usable key."""

from __future__ import annotations

import sys
from collections.abc import Callable

from shared import aio
from shared.auth import Authenticator, better_auth_base
from shared.settings import Settings


def _seconds(value: float) -> str:
    return f"{value:g} s"


def configuration(settings: Settings, authenticator: Authenticator) -> list[str]:
    jwks = authenticator.jwks
    modes = []
    if jwks is not None:
        modes.append("JWKS (Better Auth's jwt() plugin keys)")
    if authenticator.secret:
        modes.append("HS256 with BETTER_AUTH_SECRET (development tokens)")
    sessions = authenticator.sessions
    if sessions is not None:
        modes.append("Better Auth session tokens (get-session)")
    lines = ["auth configuration", f"  mode: {' + '.join(modes)}"]
    if jwks is not None:
        source = "JWKS_URL" if settings.jwks_url else "BETTER_AUTH_URL"
        lines.append(f"  key set: {jwks.url} (from {source})")
    elif settings.auth_session_tokens == "only":
        lines.append("  key set: none (AUTH_SESSION_TOKENS=only)")
    else:
        lines.append("  key set: none (BETTER_AUTH_URL and JWKS_URL are unset): only HS256")
    if sessions is not None:
        lines.append(f"  session tokens (AUTH_SESSION_TOKENS={settings.auth_session_tokens}):"
                     f" checked with {sessions.url}, each answer kept"
                     f" {_seconds(sessions.cache_seconds)} (AUTH_SESSION_CACHE_SECONDS)")
    if not authenticator.secret:
        lines.append("  HS256: off (BETTER_AUTH_SECRET is unset)")
    base = better_auth_base(settings)
    for name, setting, value in (("issuer", "JWT_ISSUER", settings.jwt_issuer),
                                 ("audience", "JWT_AUDIENCE", settings.jwt_audience)):
        if value is not None:
            lines.append(f"  {name} ({setting}): {value!r}")
        else:
            hint = f"; Better Auth puts {base!r} there by default" if base and jwks else ""
            lines.append(f"  {name} ({setting}): not checked (unset){hint}")
    lines.append(f"  limits: MAX_TOKEN_BYTES={settings.max_token_bytes},"
                 f" JWT_LEEWAY={_seconds(settings.jwt_leeway)}")
    if jwks is not None:
        lines.append("  key set timing:"
                     f" JWKS_REFETCH_INTERVAL={_seconds(jwks.refetch_interval)},"
                     f" JWKS_MAX_AGE={_seconds(jwks.max_age)},"
                     f" JWKS_FETCH_TIMEOUT={_seconds(jwks.timeout)}")
    return lines


async def check(settings: Settings, token: str | None, out: Callable[[str], None] = print) -> int:
    authenticator = Authenticator(settings)
    for line in configuration(settings, authenticator):
        out(line)
    for advice in authenticator.advice():
        out(f"  note: {advice}")
    status = 0
    jwks = authenticator.jwks
    if jwks is not None:
        out("key server")
        ok = await jwks.refresh()
        record = jwks.last_fetch
        assert record is not None
        took = f"{record.seconds * 1000:.0f} ms"
        if not ok:
            out(f"  GET {jwks.url}: FAILS after {took}: {record.error}")
            out("  the APIs answer 503 to every token they cannot check until it answers")
            status = 1
        else:
            keys = jwks.keys
            out(f"  GET {jwks.url}: answers in {took}, {len(keys)} usable key(s)")
            for key in keys.values():
                algorithms = ", ".join(sorted(key.algorithms))
                out(f"    kid {key.kid!r}: {key.kind}, verifies {algorithms}")
            for skipped in jwks.skipped:
                out(f"    skipped {skipped}")
            if not keys:
                out("  no usable key: every token is refused")
                status = 1
        # An unknown kid makes the service fetch again (within JWKS_REFETCH_INTERVAL):
        # so does this check, at once.
        jwks.refetch_interval = 0
    if token is None:
        return status
    out("token")
    steps, sub, refused = await authenticator.check(token)
    for step in steps:
        out(f"  {'ok' if step.ok else 'FAIL':<4}  {step.name}: {step.detail}")
    if refused is not None:
        answer = "503" if refused.reason == "keys_unavailable" else "401"
        out(f"refused ({refused.reason}): the APIs answer {answer} {refused.message!r}")
        return 1
    out(f"accepted: the APIs act as user {sub!r}")
    return 0


def main(settings: Settings, token: str | None) -> int:
    if token == "-":
        token = sys.stdin.read().strip()
    return aio.run(lambda: check(settings, token))
