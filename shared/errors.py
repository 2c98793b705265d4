"""Errors that carry their HTTP status and envelope code. Raised anywhere, rendered once."""

from __future__ import annotations

from typing import Any

import asyncpg

# What a lost, refused or missing database raises through asyncpg: both APIs answer it
# with 503 SERVICE_UNAVAILABLE (and Retry-After), never 500.
DATABASE_DOWN: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, timed out
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # shutting down, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections
    asyncpg.exceptions.InvalidCatalogNameError,  # the database does not exist (yet)
    # A connection whose backend was terminated while it sat in a pool can fail its
    # next use with "cannot switch to state ..." (nothing was sent).
    asyncpg.exceptions.InternalClientError,
    # The server's statement_timeout (DB_STATEMENT_TIMEOUT): it did not answer in time.
    # asyncpg's own command_timeout raises TimeoutError, an OSError.
    asyncpg.exceptions.QueryCanceledError,
)


class ApiError(Exception):
    status = 500
    code = "INTERNAL_ERROR"
    default_message = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details
        self.headers = headers or {}
        self.meta: dict[str, Any] = {}  # extra `meta` keys of the envelope
        super().__init__(self.message)

    def with_meta(self, **extra: Any) -> ApiError:
        """This error, its envelope's `meta` carrying `extra` too (e.g. a read's
        `position` and `stale`, so a 404 says whether the read tables had caught up)."""
        self.meta.update(extra)
        return self


class Unauthorized(ApiError):
    status, code, default_message = 401, "UNAUTHORIZED", "Invalid token"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ApiError):
    status, code, default_message = 403, "FORBIDDEN", "Access denied"


class NotFound(ApiError):
    status, code, default_message = 404, "NOT_FOUND", "Not found"


class MethodNotAllowed(ApiError):
    status, code, default_message = 405, "METHOD_NOT_ALLOWED", "Method not allowed"


class Conflict(ApiError):
    status, code, default_message = 409, "CONFLICT", "Conflict"


class PreconditionFailed(ApiError):
    status, code, default_message = 412, "PRECONDITION_FAILED", "Precondition failed"


class PayloadTooLarge(ApiError):
    status, code, default_message = 413, "PAYLOAD_TOO_LARGE", "Request body too large"


class ValidationFailed(ApiError):
    status, code, default_message = 422, "VALIDATION_ERROR", "Validation failed"


class ServiceUnavailable(ApiError):
    status, code, default_message = 503, "SERVICE_UNAVAILABLE", "Service unavailable"

    def __init__(self, message: str | None = None, *, details: Any = None) -> None:
        # Every 503 says when to retry, like the handler for a lost database connection.
        super().__init__(message, details=details, headers={"Retry-After": "1"})
