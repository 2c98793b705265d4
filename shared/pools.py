"""How the APIs open their asyncpg pools: the timeouts that turn a hung database into
fast 503s, and the start-up check of the connection budget.

A hung database (the TCP connection stays open, nothing answers: a SIGSTOPped server,
a network black hole) raises no error by itself; only timeouts end the wait:

- `DB_CONNECT_TIMEOUT` bounds opening a connection;
- `DB_POOL_TIMEOUT` bounds the wait for a pooled connection;
- `DB_STATEMENT_TIMEOUT` bounds each statement. asyncpg (`command_timeout`) then sends
  PostgreSQL a cancel request and, when that goes unanswered too, drops the connection
  after as long again. The server is told the same limit (`statement_timeout`), so a
  statement it runs too long fails there as well, leaving the connection usable.
- `DB_IDLE_IN_TRANSACTION_TIMEOUT`: the server ends a session whose client went silent
  inside a transaction, which would otherwise hold its locks (and hold back the
  projector, which waits for every older transaction) until TCP gives up.

A statement the client gave up on may still commit (its bytes may reach the server
later): its request is a 503, never a success, and an `Idempotency-Key` retry settles it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import asyncpg

from shared.settings import Settings

log = logging.getLogger("taskservice.pools")

_BUDGET = (
    "SELECT current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int,"
    # PostgreSQL 16+: slots for roles with pg_use_reserved_connections.
    " coalesce(current_setting('reserved_connections', true), '0')::int,"
    " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
)
POOL_SETTINGS = "DB_POOL_SIZE / DB_MAX_OVERFLOW"


def pool_options(settings: Settings, dsn: str, application_name: str) -> dict[str, Any]:
    """`asyncpg.create_pool` keyword arguments for an API's pool on `dsn`: the connect
    and statement timeouts, and the server settings `server_settings` names."""
    options: dict[str, Any] = {
        "timeout": settings.db_connect_timeout,
        "command_timeout": settings.db_statement_timeout,
        "server_settings": server_settings(settings, dsn, application_name),
    }
    if settings.db_transaction_pooler:
        # A prepared statement lives in one server session, which a transaction-mode
        # pooler hands to another client after each transaction: asyncpg then uses
        # unnamed statements only (its FAQ; docs/scaling.md, "PgBouncer").
        options["statement_cache_size"] = 0
    return options


def server_settings(settings: Settings, dsn: str, application_name: str) -> dict[str, str]:
    """Sent when each connection starts, unless the URL names them (`?statement_timeout=`
    and the like; asyncpg passes unknown URL parameters to the server):
    `application_name` (libpq's PGAPPNAME, else ours), `statement_timeout` and
    `idle_in_transaction_session_timeout`; through a transaction pooler
    (`DB_TRANSACTION_POOLER`), `application_name` only."""
    wanted = {
        "application_name": os.environ.get("PGAPPNAME") or application_name,
        "statement_timeout": f"{round(settings.db_statement_timeout * 1000)}ms",
    }
    if settings.db_idle_in_transaction_timeout > 0:
        wanted["idle_in_transaction_session_timeout"] = (
            f"{round(settings.db_idle_in_transaction_timeout * 1000)}ms"
        )
    if settings.db_transaction_pooler:
        # PgBouncer refuses other startup parameters ("unsupported startup parameter"):
        # behind it the server-side timeouts are the role's (ALTER ROLE ... SET), and
        # asyncpg's own command_timeout still cancels a statement that runs too long.
        wanted = {"application_name": wanted["application_name"]}
    return {name: value for name, value in wanted.items() if f"{name}=" not in dsn}


@dataclass(frozen=True)
class Budget:
    """The server's connection slots as one process sees them when it starts."""

    max_connections: int
    reserved: int  # superuser_reserved_connections + reserved_connections
    in_use: int  # client connections right now, this process's own included
    held: int  # of those, this process's own
    wanted: int  # the most this process may hold

    @property
    def allowed(self) -> int:
        """Connections ordinary roles may open."""
        return self.max_connections - self.reserved

    @property
    def reach(self) -> int:
        """What the client connections may reach: the others' now, plus this process's
        most (a lower bound: the others' pools may grow too)."""
        return self.in_use - self.held + self.wanted

    @property
    def exhaustible(self) -> bool:
        return self.reach > self.allowed


async def check_connection_budget(
    conn: asyncpg.Connection,
    *,
    process: str,
    wanted: int,
    made_of: str,
    to_change: str = POOL_SETTINGS,
    held: int = 1,
) -> Budget:
    """Compare the most `process` may hold (`wanted`, `made_of` says of what) plus the
    connections others hold now with what the server allows, on `conn`; log a warning
    naming `to_change` when the sum is over. `held`: this process's connections open
    now (counted among the server's, not twice)."""
    row = await conn.fetchrow(_BUDGET)
    budget = Budget(row[0], row[1] + row[2], row[3], held, wanted)
    if budget.exhaustible:
        log.warning(
            "connection budget: the %s may hold %d connections (%s) and %d other"
            " connections are open now: %d in all, but the server allows %d"
            " (max_connections %d minus %d reserved). Requests will get 503 once they run"
            " out. Lower %s here or in the other processes, or raise max_connections"
            " (POSTGRES_MAX_CONNECTIONS in compose.yaml); docs/scaling.md, \"Connection"
            " budget\".",
            process, budget.wanted, made_of, budget.in_use - budget.held, budget.reach,
            budget.allowed, budget.max_connections, budget.reserved, to_change,
        )
    return budget


async def warn_if_pool_over_budget(
    pool: asyncpg.Pool, settings: Settings, *, process: str, beside: int = 0,
    beside_what: str = "",
) -> Budget | None:
    """`check_connection_budget` for an API's pool (DB_POOL_SIZE + DB_MAX_OVERFLOW) and
    `beside` connections the process holds besides it (`beside_what`), on one of the
    pool's connections. It never stops a start: a database that cannot answer is
    logged and skipped (None)."""
    made_of = f"DB_POOL_SIZE {settings.db_pool_size} + DB_MAX_OVERFLOW {settings.db_max_overflow}"
    if beside:
        made_of += f" + {beside} {beside_what}".rstrip()
    wanted = settings.db_pool_size + settings.db_max_overflow + beside
    try:
        async with pool.acquire() as conn:
            return await check_connection_budget(
                conn, process=process, wanted=wanted, made_of=made_of, held=pool.get_size()
            )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        log.warning("connection budget not checked: %s: %s", type(e).__name__, e)
        return None
