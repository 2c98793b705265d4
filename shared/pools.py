"""How the APIs open their asyncpg pools: the timeouts that turn a hung database into
fast 503s.

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

import os
from typing import Any

import asyncpg

from shared.settings import Settings


def pool_options(settings: Settings, dsn: str, application_name: str) -> dict[str, Any]:
    """`asyncpg.create_pool` keyword arguments for an API's pool on `dsn`: the connect
    and statement timeouts, and the server settings `server_settings` names."""
    return {
        "timeout": settings.db_connect_timeout,
        "command_timeout": settings.db_statement_timeout,
        "server_settings": server_settings(settings, dsn, application_name),
    }


def server_settings(settings: Settings, dsn: str, application_name: str) -> dict[str, str]:
    """Sent when each connection starts, unless the URL names them (`?statement_timeout=`
    and the like; asyncpg passes unknown URL parameters to the server):
    `application_name` (libpq's PGAPPNAME, else ours), `statement_timeout` and
    `idle_in_transaction_session_timeout`."""
    wanted = {
        "application_name": os.environ.get("PGAPPNAME") or application_name,
        "statement_timeout": f"{round(settings.db_statement_timeout * 1000)}ms",
    }
    if settings.db_idle_in_transaction_timeout > 0:
        wanted["idle_in_transaction_session_timeout"] = (
            f"{round(settings.db_idle_in_transaction_timeout * 1000)}ms"
        )
    return {name: value for name, value in wanted.items() if f"{name}=" not in dsn}
