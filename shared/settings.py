"""One validated settings object, built once from the environment."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Literal
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.datakeys import MasterKeyError, parse_master_keys

PLACEHOLDER_SECRETS = {
    "changeme",
    "change-me",
    "secret",
    "your-secret-here",
    "placeholder",
    "set me",
    "replace-with-a-long-random-hex-string",  # .env.example's placeholder text
}
MIN_SECRET_LENGTH = 32
MIN_SECRET_BITS = 80
MAKE_A_SECRET = (
    "make one with `openssl rand -base64 48` or"
    ' `python -c "import secrets; print(secrets.token_urlsafe(48))"`'
)


def estimated_bits(text: str) -> float:
    """A Shannon estimate of `text`'s entropy: its length times the entropy of its own
    character frequencies. It cannot see order, so repetition is checked apart."""
    n = len(text)
    return -n * sum(c / n * math.log2(c / n) for c in Counter(text).values()) if n else 0.0


def repeating_period(text: str) -> int | None:
    """The length of the shortest piece `text` is made of, over and over (its last
    repetition may be cut short), when that piece is at most half as long; else None."""
    for period in range(1, len(text) // 2 + 1):
        if text[period:] == text[:-period]:
            return period
    return None


def weak_secret(secret: str) -> str | None:
    """Why `secret` is unfit for production (a known placeholder, shorter than
    MIN_SECRET_LENGTH, a short piece repeated, fewer than MIN_SECRET_BITS by
    `estimated_bits`), or None. It catches the usual mistakes; it does not prove a
    secret random."""
    text = secret.strip()
    lowered = text.lower()
    if lowered in PLACEHOLDER_SECRETS or text.startswith("dev-"):
        return "is a placeholder"
    if len(text) < MIN_SECRET_LENGTH:
        return f"is shorter than {MIN_SECRET_LENGTH} characters"
    period = repeating_period(lowered)
    if period == 1:
        return "is one character repeated"
    if period is not None:
        return f"is a piece of {period} characters repeated"
    bits = estimated_bits(text)
    if bits < MIN_SECRET_BITS:
        return (
            f"has too little entropy: about {bits:.0f} bits, fewer than {MIN_SECRET_BITS}"
            " (estimated as its length times the Shannon entropy of its characters'"
            " frequencies)"
        )
    return None

# scheme://host[:port]: a DNS name or an IP literal (nothing nginx or a header could
# read as syntax: the gateway's config gets the list too, deploy/nginx.conf).
_ORIGIN = re.compile(
    r"^https?://(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?/?$"
)
# A request header name as a frontend sends it (RFC 9110 token, less its rare symbols).
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CLAIM_URL = re.compile(r"^https?://[^/\s?#@]+(/[^\s#]*)?$")


def normalise_claim_url(value: str, *, origin_only: bool = False) -> str:
    """An issuer or audience as Better Auth writes its base URL: for an http(s) URL,
    the scheme and host in lower case, no default port, no trailing slash (`origin_only`:
    no path either); any other text only stripped of surrounding white space."""
    text = value.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return text
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
        return text
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port in (None, {"http": 80, "https": 443}[scheme]) else f"{host}:{port}"
    path = "" if origin_only else parts.path.rstrip("/")
    query = f"?{parts.query}" if parts.query and not origin_only else ""
    return f"{scheme}://{netloc}{path}{query}"


class SettingsError(Exception):
    """A setting is missing or unsafe; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    environment: Literal["development", "test", "production"] = "production"
    database_url: str | None = None
    # The query side may read from a replica; defaults to database_url.
    read_database_url: str | None = None

    better_auth_secret: str | None = None
    better_auth_url: str | None = None
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # At most one key-set fetch for unknown kids per this many seconds per process.
    jwks_refetch_interval: float = Field(default=5.0, ge=0)
    jwks_max_age: float = Field(default=900.0, ge=1)
    # The whole of one key-set fetch (connect, headers, body), in seconds.
    jwks_fetch_timeout: float = Field(default=5.0, gt=0, le=60)
    # Better Auth session tokens (its bearer() plugin) as bearer tokens, checked with
    # its get-session: "off"; "also" (beside JWTs); "only" (no key set is fetched).
    auth_session_tokens: Literal["off", "also", "only"] = "off"
    # How long get-session's answer for a token is kept (never past the session's end).
    auth_session_cache_seconds: float = Field(default=60.0, ge=0, le=3600)
    jwt_leeway: float = Field(default=0.0, ge=0, le=300)

    max_body_bytes: int = Field(default=65_536, ge=1024)
    # Better Auth's default payload is the whole user (a data: URL image included).
    max_token_bytes: int = Field(default=16_384, ge=256)
    idempotency_ttl_hours: float = Field(default=24.0, ge=24.0)
    # The command API forgets Idempotency-Keys past their TTL this often (one process
    # at a time, under an advisory lock); 0: never (run `taskctl db purge-idempotency`).
    idempotency_purge_interval: float = Field(default=3600.0, ge=0)
    command_retries: int = Field(default=20, ge=1, le=1000)
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # Seconds to open a new database connection (TCP, TLS, authentication).
    db_connect_timeout: int = Field(default=1, ge=1)
    # Longest a request waits for a free pooled connection before it is a 503.
    db_pool_timeout: float = Field(default=3.0, gt=0)
    # Longest one statement of the APIs may run: the client cancels it (asyncpg's
    # command_timeout) and so does the server (statement_timeout); a 503 either way.
    # With these defaults a hung database is a 503 within 3 s (docs/reliability.md).
    db_statement_timeout: float = Field(default=1.5, gt=0, le=600)
    # The server ends an API's session left idle inside a transaction this long
    # (idle_in_transaction_session_timeout; 0: not set).
    db_idle_in_transaction_timeout: float = Field(default=10.0, ge=0)
    # DATABASE_URL (and READ_DATABASE_URL) lead to a pooler in transaction mode
    # (PgBouncer): no prepared-statement cache, no startup parameter but
    # application_name (set the server-side timeouts on the role instead), and the
    # query API's watch polls instead of LISTEN. Never for the projector, whose lock
    # and LISTEN need a session of their own (docs/scaling.md).
    db_transaction_pooler: bool = False
    read_wait_timeout: float = Field(default=2.0, ge=0, le=30)
    # /api/ready on the query API answers 503 while the oldest event not yet projected
    # is older than this many seconds.
    ready_max_lag_seconds: float = Field(default=30.0, gt=0)
    # Browser origins allowed to call the APIs with credentials, comma-separated
    # (scheme://host[:port]); empty: no cross-origin access. Never "*".
    cors_origins: str = ""
    # Request headers preflights allow besides the API's own and the tracing ones
    # (shared/cors.py), comma-separated names; "*" is refused.
    cors_allow_headers_extra: str = ""
    # The direct path (taskctl serving with uvicorn): a request's line and headers must
    # arrive within HTTP_HEADER_TIMEOUT seconds, its body within HTTP_BODY_TIMEOUT
    # seconds after them; else 408 and the connection is closed (shared/serving.py).
    http_header_timeout: float = Field(default=10.0, gt=0, le=300)
    http_body_timeout: float = Field(default=30.0, gt=0, le=600)
    # The query API's live stream of task changes (query_api/stream.py, docs/streams.md):
    # open streams per user and per process (past them 429 / 503), a heartbeat comment
    # every STREAM_HEARTBEAT_SECONDS, the client's reconnection delay (the `retry:` field),
    # the changes one stream may have waiting before it is dropped as a slow consumer,
    # and how long one write to a stream may block before the same.
    stream_max_per_user: int = Field(default=10, ge=1, le=1000)
    stream_max_per_process: int = Field(default=2000, ge=1, le=100_000)
    stream_heartbeat_seconds: float = Field(default=15.0, ge=0.1, le=300)
    stream_retry_ms: int = Field(default=2000, ge=100, le=600_000)
    stream_buffer_events: int = Field(default=1000, ge=10, le=1_000_000)
    stream_send_timeout: float = Field(default=10.0, gt=0, le=300)
    # The key of the stream tickets (a POST returns one for EventSource, which cannot send
    # an Authorization header); unset: derived from BETTER_AUTH_SECRET, else random per
    # process (then a ticket works only on the replica that issued it).
    stream_ticket_secret: str | None = None
    # The master keys that wrap the users' data keys (`shared.datakeys`): 32-byte keys,
    # base64 or hex, comma-separated; the first wraps new data keys, every one unwraps
    # (rotation: docs/privacy.md). Required in production; elsewhere, unset, the
    # development key `taskctl db init` keeps in the database.
    data_master_key: str | None = None
    # The projector's Prometheus /metrics and /health endpoint (0 turns it off).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    # The active projector's lease (`projections.lease`): it renews it every
    # PROJECTOR_HEARTBEAT_SECONDS; a standby fences and replaces one that has not renewed
    # it for PROJECTOR_LEASE_SECONDS (the database's clock). Takeover of a hung projector:
    # within lease + heartbeat (+ 1 s to end its backends).
    projector_lease_seconds: float = Field(default=10.0, ge=1.0, le=600)
    projector_heartbeat_seconds: float = Field(default=2.0, ge=0.1, le=60)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",") if o.strip()):
            if origin == "*" or "*" in origin:
                raise ValueError(
                    "CORS_ORIGINS must list origins explicitly ('*' is not allowed with"
                    " credentials)"
                )
            if not _ORIGIN.match(origin):
                raise ValueError(
                    f"CORS_ORIGINS: {origin!r} is not an origin like https://app.example.com"
                )
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.cors_origins.split(",") if o.strip()]

    @field_validator("cors_allow_headers_extra")
    @classmethod
    def _check_header_names(cls, value: str) -> str:
        for name in (n.strip() for n in value.split(",") if n.strip()):
            if "*" in name:
                raise ValueError(
                    "CORS_ALLOW_HEADERS_EXTRA must name headers explicitly ('*' is not a"
                    " wildcard for requests with credentials)"
                )
            if not _HEADER_NAME.match(name):
                raise ValueError(
                    f"CORS_ALLOW_HEADERS_EXTRA: {name!r} is not a header name like"
                    " x-client-version (letters, digits, '-', '_', '.')"
                )
        return value

    @property
    def cors_allow_headers_extra_list(self) -> list[str]:
        return [n.strip().lower() for n in self.cors_allow_headers_extra.split(",") if n.strip()]

    @model_validator(mode="after")
    def _check_auth(self, info: ValidationInfo) -> Settings:
        # Processes that verify no tokens (projector, db init, replay) pass
        # require_auth=False; the APIs always need an auth method.
        require_auth = (info.context or {}).get("require_auth", True)
        if require_auth and not (self.better_auth_secret or self.better_auth_url or self.jwks_url):
            raise ValueError(
                "no auth method configured: set BETTER_AUTH_SECRET (HS256) "
                "or BETTER_AUTH_URL / JWKS_URL (Better Auth JWT plugin keys)"
            )
        secret = self.better_auth_secret
        if secret and self.environment == "production":
            weakness = weak_secret(secret)
            if weakness is not None:
                raise ValueError(f"BETTER_AUTH_SECRET {weakness}; {MAKE_A_SECRET}")
        return self

    @field_validator("jwt_issuer", "jwt_audience")
    @classmethod
    def _normalise_claim(cls, value: str | None, info: ValidationInfo) -> str | None:
        # Better Auth writes its base URL's origin: no trailing slash, host in lower case.
        if value is None or not value.strip():
            return None
        normalised = normalise_claim_url(value)
        url_like = normalised.lower().startswith(("http:", "https:"))
        if url_like and not _CLAIM_URL.match(normalised):
            name = str(info.field_name)
            raise ValueError(
                f"{normalised!r} is not a URL like https://auth.example.com: set"
                f" {name.upper()} to the exact {name[4:]} Better Auth signs with (by default"
                " its base URL)")
        return normalised

    @model_validator(mode="after")
    def _check_master_key(self) -> Settings:
        if self.data_master_key is None:
            return self
        try:
            keys = parse_master_keys(self.data_master_key)
        except MasterKeyError as e:
            raise ValueError(str(e)) from None
        if self.environment == "production":
            for part in (p.strip() for p in self.data_master_key.split(",") if p.strip()):
                weakness = weak_secret(part)
                if weakness is not None or len(set(keys)) != len(keys):
                    raise ValueError(f"DATA_MASTER_KEY {weakness or 'repeats a key'};"
                                     " make one with `python -c \"import secrets;"
                                     " print(secrets.token_urlsafe(32))\"`")
        return self

    @model_validator(mode="after")
    def _check_better_auth_url(self) -> Settings:
        # The key set's own URL in BETTER_AUTH_URL would be fetched as ".../jwks/jwks": a
        # 404 for ever, every token a 503. Said at start-up, with the setting to use.
        url = (self.better_auth_url or "").rstrip("/")
        if url and not self.jwks_url and urlsplit(url).path.endswith("/jwks"):
            raise ValueError(
                f"BETTER_AUTH_URL={self.better_auth_url} is the key set's URL: set it to Better"
                " Auth's base URL (its keys are read from {BETTER_AUTH_URL}/api/auth/jwks), or"
                " set JWKS_URL to the key set's URL instead")
        return self

    @model_validator(mode="after")
    def _check_session_tokens(self) -> Settings:
        if self.auth_session_tokens != "off" and not self.better_auth_url:
            raise ValueError(
                f"AUTH_SESSION_TOKENS={self.auth_session_tokens} needs BETTER_AUTH_URL: session"
                " tokens are checked with Better Auth's {BETTER_AUTH_URL}/api/auth/get-session")
        return self

    @property
    def session_url(self) -> str | None:
        """Better Auth's get-session, for AUTH_SESSION_TOKENS."""
        if self.auth_session_tokens == "off" or not self.better_auth_url:
            return None
        url = self.better_auth_url.rstrip("/")
        return url + ("/get-session" if urlsplit(url).path else "/api/auth/get-session")

    @model_validator(mode="after")
    def _check_lease(self) -> Settings:
        if self.projector_heartbeat_seconds * 2 > self.projector_lease_seconds:
            raise ValueError(
                "PROJECTOR_HEARTBEAT_SECONDS must be at most half of PROJECTOR_LEASE_SECONDS"
                " (the active projector renews its lease at least twice per lease)"
            )
        return self

    @property
    def effective_jwks_url(self) -> str | None:
        if self.jwks_url:
            return self.jwks_url
        if self.better_auth_url:
            # As Better Auth reads its baseURL: one with a path is the auth route itself.
            url = self.better_auth_url.rstrip("/")
            return url + ("/jwks" if urlsplit(url).path else "/api/auth/jwks")
        return None

    def require_database_url(self) -> str:
        if not self.database_url:
            raise SettingsError("DATABASE_URL is not set")
        return self.database_url

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        require_auth: bool = True,
        **overrides: object,
    ) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = env.get(name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        values.update(overrides)
        try:
            return cls.model_validate(values, context={"require_auth": require_auth})
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']).upper() or 'settings'}: {err['msg']}"
                for err in e.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None


SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)


def database_url(url: str, *, dbname: str | None = None, user: str | None = None) -> str:
    """`url` naming another database and/or another user (without a password then),
    every other part kept, in each form libpq takes: the host in the authority, a Unix
    socket's directory in `?host=` (the authority empty, or only a user), the database
    or user in the query (which is dropped for the one replaced)."""
    parts = urlsplit(url)
    replaced = ({"dbname"} if dbname is not None else set()) | (
        {"user", "password"} if user is not None else set())
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k not in replaced]
    netloc = parts.netloc
    if user is not None:
        netloc = f"{quote(user, safe='')}@{netloc.rpartition('@')[2]}"
    path = parts.path if dbname is None else "/" + quote(dbname, safe="")
    tail = f"?{urlencode(query, safe='/')}" if query else ""
    return f"{parts.scheme}://{netloc}{path}{tail}"


def postgres_params(url: str) -> dict[str, str]:
    """Split a postgresql:// URL into host, port, dbname, user and password."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise SettingsError(f"DATABASE_URL must start with postgresql://, got {parts.scheme!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    host = unquote(parts.hostname or "") or query.get("host") or "localhost"
    return {
        "host": host,
        "port": str(parts.port or query.get("port") or 5432),
        "dbname": unquote(parts.path.lstrip("/")) or query.get("dbname") or "postgres",
        "user": unquote(parts.username or "") or query.get("user") or "postgres",
        "password": unquote(parts.password or "") or query.get("password") or "",
    }
