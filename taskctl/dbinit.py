"""`taskctl db init`: every table the service needs, created once, explicitly, and the
roles the processes connect as, each granted only what its code does.

Processes never create tables at start-up (concurrent creation fails intermittently)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql

from projections.lease import LEASE_DDL
from projections.manifest import ddl, table_names
from projections.replay import VERSIONS_DDL
from shared.catalog import (
    DDL_LOCK,
    EVENTS_TABLE,
    IDEMPOTENCY_TABLE,
    LEASES_TABLE,
    LIVE,
    OWN_POSITIONS_TABLE,
    SERVICE_KEYS_TABLE,
    VERSIONS_TABLE,
    Tables,
)
from shared.datakeys import DATA_KEYS_DDL, DATA_KEYS_TABLE, DEV_MASTER_TABLE
from shared.eventstore import create_schema
from shared.position import KEY_NAME as POSITION_KEY_NAME
from shared.row_security import (
    OWNED_ELSEWHERE_FUNCTION,
    PROJECTOR_POLICY,
    STREAM_ROLE,
    STREAMS_POLICY,
    USER_POLICY,
    USER_QUAL,
    USERS_QUAL,
)
from shared.settings import MAKE_A_SECRET, Settings, weak_secret

APPEND_ONLY_FUNCTION = "taskservice_events_append_only"
APPEND_ONLY_MESSAGE = "the event store is append-only"

# The event store is append-only, even for a superuser (triggers bind every role, unlike
# REVOKE): corrections are new events. An operator repairs data deliberately in a
# maintenance session that sets `session_replication_role = replica` (which skips these
# triggers) or disables them inside one audited transaction; see
# docs/operations-append-only.md. Row triggers cover UPDATE and DELETE, a statement
# trigger TRUNCATE (which fires no row triggers).
APPEND_ONLY_DDL = (
    f"CREATE OR REPLACE FUNCTION {APPEND_ONLY_FUNCTION}() RETURNS trigger"
    " LANGUAGE plpgsql AS $$ BEGIN"
    f" RAISE EXCEPTION '{APPEND_ONLY_MESSAGE}: % on % is not allowed', TG_OP, TG_TABLE_NAME"
    "  USING ERRCODE = 'insufficient_privilege',"
    "  HINT = 'Record a correction as a new event; for a deliberate repair see"
    " docs/operations-append-only.md';"
    " END $$",
    f"DROP TRIGGER IF EXISTS {EVENTS_TABLE}_no_update_delete ON {EVENTS_TABLE}",
    f"CREATE TRIGGER {EVENTS_TABLE}_no_update_delete BEFORE UPDATE OR DELETE ON {EVENTS_TABLE}"
    f" FOR EACH ROW EXECUTE FUNCTION {APPEND_ONLY_FUNCTION}()",
    f"DROP TRIGGER IF EXISTS {EVENTS_TABLE}_no_truncate ON {EVENTS_TABLE}",
    f"CREATE TRIGGER {EVENTS_TABLE}_no_truncate BEFORE TRUNCATE ON {EVENTS_TABLE}"
    f" FOR EACH STATEMENT EXECUTE FUNCTION {APPEND_ONLY_FUNCTION}()",
)


class InitRefused(RuntimeError):
    """`db init` cannot do its job safely; the message says why and what to do."""


class TransactionCounterBehind(InitRefused):
    """The cluster's transaction counter is behind the stored events' tx_id values
    (a restore into a new cluster): new events would sort before old ones."""


# Events are ordered by the id of the transaction that wrote them (`tx_id xid8`). A dump
# restored into a NEW cluster keeps the old tx_id values while the new cluster's counter
# starts low: every new event would then sort before the restored ones, and readers
# that have passed them would never see the new events.
MAX_TX_ID = f"SELECT max(tx_id)::text FROM {EVENTS_TABLE}"
CURRENT_TX_ID = "SELECT pg_current_xact_id()::text"


def check_transaction_counter(settings: Settings) -> None:
    """Refuse (TransactionCounterBehind) when max(tx_id) of the stored events is not
    below this cluster's current transaction id."""
    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (EVENTS_TABLE,)).fetchone()
        if not (exists and exists[0]):
            return
        if not conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'tx_id'"
            " AND NOT attisdropped", (EVENTS_TABLE,)
        ).fetchone():
            return  # a store from before tx_id: the column is added now, with current ids
        row = conn.execute(MAX_TX_ID).fetchone()
        highest = int(row[0]) if row and row[0] is not None else None
        current_row = conn.execute(CURRENT_TX_ID).fetchone()
        assert current_row is not None
        current = int(current_row[0])
    if highest is not None and highest >= current:
        epoch = (highest >> 32) + 1
        raise TransactionCounterBehind(
            f"{EVENTS_TABLE} holds events written by transaction {highest}, but this"
            f" PostgreSQL cluster's transaction id is only {current}: was it restored into"
            " a new cluster? New events would sort before the restored ones. Stop the"
            f" cluster, run `pg_resetwal -e {epoch} <data directory>` to advance its"
            " transaction id epoch, start it again and rerun `taskctl db init`"
            " (docs/operations.md, 'Back up and restore'). Nothing was changed."
        )


def init_database(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Everything, idempotently; the role passwords come from `environ` (default the
    process's environment, `PASSWORD_VARIABLES`). Raises `InitRefused`."""
    check_transaction_counter(settings)
    role_passwords(settings, os.environ if environ is None else environ)  # refuse early
    create_schema(settings)
    _make_events_append_only(settings)
    _make_service_keys(settings)
    _make_data_keys(settings)
    create_read_tables(settings.require_database_url())
    grant_roles(settings, environ)


def create_read_tables(url: str, tables: Tables = LIVE) -> None:
    """Every read model's tables and indexes and the checkpoints (`projections.manifest`),
    under `tables`' names; safe to run again."""
    with psycopg.connect(url) as conn, conn.transaction():
        # Serialise concurrent `db init`s: CREATE ... IF NOT EXISTS can race.
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
        for statement in ddl(tables):
            conn.execute(statement)
        if tables == LIVE:
            conn.execute(VERSIONS_DDL)
            for statement in LEASE_DDL:  # the projector's lease, its epoch on the checkpoint
                conn.execute(statement)


SERVICE_KEYS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {SERVICE_KEYS_TABLE} ("
    " name text PRIMARY KEY, key bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
)


def _make_service_keys(settings: Settings) -> None:
    """The key positions and cursors are sealed with (`shared.position`): made once, at
    random, and kept (a new key would make every position clients hold a 422)."""
    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
        conn.execute(SERVICE_KEYS_DDL)
        conn.execute(
            f"INSERT INTO {SERVICE_KEYS_TABLE} (name, key) VALUES (%s, %s)"
            " ON CONFLICT (name) DO NOTHING",
            (POSITION_KEY_NAME, secrets.token_bytes(32)),
        )


def _make_data_keys(settings: Settings) -> None:
    """The users' data keys' table (`shared.datakeys`) and, outside production, the
    development master key that wraps them when DATA_MASTER_KEY is unset."""
    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
        for statement in DATA_KEYS_DDL:
            conn.execute(statement)
        if settings.environment != "production":
            conn.execute(
                f"INSERT INTO {DEV_MASTER_TABLE} (id, key) VALUES (1, %s)"
                " ON CONFLICT (id) DO NOTHING",
                (secrets.token_bytes(32),),
            )


def _make_events_append_only(settings: Settings) -> None:
    """Triggers that make UPDATE, DELETE and TRUNCATE of stored events fail (idempotent)."""
    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
        for statement in APPEND_ONLY_DDL:
            conn.execute(statement)


# -- least privilege -------------------------------------------------------------------
#
# `db init` runs as the tables' owner; the processes connect as these roles, which can
# do what their code does and nothing else (docs/operations.md, "Database roles"). None
# owns a table, so none can ALTER, DROP, disable a trigger or grant; and no role is
# granted UPDATE, DELETE or TRUNCATE on the events. Replay renames and drops tables,
# which only an owner may: it runs as the owner and carries these grants over to the
# tables it builds (`projections.replay._copy_privileges`).

COMMAND_ROLE = "taskservice_command"
PROJECTOR_ROLE = "taskservice_projector"
QUERY_ROLE = "taskservice_query"
ROLES = (COMMAND_ROLE, PROJECTOR_ROLE, QUERY_ROLE)
# Set, db init gives the role this password (compose does, from .env); unset, the role
# has none and logs in only where pg_hba.conf trusts it (or the operator sets one).
PASSWORD_VARIABLES = {
    COMMAND_ROLE: "COMMAND_DB_PASSWORD",
    PROJECTOR_ROLE: "PROJECTOR_DB_PASSWORD",
    QUERY_ROLE: "QUERY_DB_PASSWORD",
}
ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
# The stream hub's role (`shared.row_security`): no login; the query role may SET ROLE
# to it for one transaction but does not inherit it (NOINHERIT), so its policy never
# applies to the query role's own reads.
STREAM_ROLE_ATTRIBUTES = "NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
ALL_ROLES = (*ROLES, STREAM_ROLE)

# The command API names these four columns in every INSERT (`command_api.store`): the
# order columns (notification_id, tx_id) always take their defaults, so even the command
# role cannot place an event before ones already projected.
EVENT_INSERT_COLUMNS = ("originator_id", "originator_version", "topic", "state")
READ_WRITE = ("SELECT", "INSERT", "UPDATE", "DELETE")

Grants = dict[str, dict[str, tuple[str, ...]]]


def grants(t: Tables = LIVE) -> Grants:
    """Table -> role -> privileges, for every table `db init` makes (an empty mapping:
    the owner's alone). The read tables come from the manifest, so a new read model is
    granted like the others; any other new table must be added here (a test fails on a
    table of `shared.catalog`, or of an initialised database, that is missing)."""
    read_tables: Grants = {
        name: {PROJECTOR_ROLE: READ_WRITE, QUERY_ROLE: ("SELECT",), STREAM_ROLE: ("SELECT",)}
        for name in table_names(t)
    }
    return {
        EVENTS_TABLE: {
            COMMAND_ROLE: ("SELECT", f"INSERT ({', '.join(EVENT_INSERT_COLUMNS)})"),
            PROJECTOR_ROLE: ("SELECT",),
            QUERY_ROLE: ("SELECT",),  # the query API's lag: the oldest unprojected event
            STREAM_ROLE: ("SELECT",),  # the stream's changes, in the events' order
        },
        # Written with the events; DELETE for the purge of expired keys.
        # UPDATE: a retry's found record is touched so its answer waits for a
        # synchronous standby (`command_api.store.key_record`).
        IDEMPOTENCY_TABLE: {COMMAND_ROLE: ("SELECT", "INSERT", "UPDATE", "DELETE")},
        # The sealing key: read by the APIs, written by db init alone.
        SERVICE_KEYS_TABLE: {COMMAND_ROLE: ("SELECT",), QUERY_ROLE: ("SELECT",)},
        # The users' data keys: made by the command API (a user's first command), read
        # by it and the projector; deleted by `taskctl users forget`, as the owner.
        DATA_KEYS_TABLE: {COMMAND_ROLE: ("SELECT", "INSERT"), PROJECTOR_ROLE: ("SELECT",)},
        # Outside production, the master key that wraps them (DATA_MASTER_KEY unset).
        DEV_MASTER_TABLE: {COMMAND_ROLE: ("SELECT",), PROJECTOR_ROLE: ("SELECT",)},
        # Upserted with the events (INSERT ... ON CONFLICT DO UPDATE); read by queries.
        OWN_POSITIONS_TABLE: {COMMAND_ROLE: ("SELECT", "INSERT", "UPDATE"), QUERY_ROLE: ("SELECT",)},
        # SELECT ... FOR UPDATE (the projector's lock on its row) needs UPDATE.
        t.checkpoints: {PROJECTOR_ROLE: ("SELECT", "INSERT", "UPDATE"), QUERY_ROLE: ("SELECT",),
                        STREAM_ROLE: ("SELECT",)},
        VERSIONS_TABLE: {},  # written and read by replay and status, as the owner
        # The lease row: inserted once, locked FOR UPDATE and renewed by the projector.
        LEASES_TABLE: {PROJECTOR_ROLE: ("SELECT", "INSERT", "UPDATE")},
        **read_tables,
    }


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677):
    `ALTER ROLE ... PASSWORD` given the verifier stores it as is, so the password itself
    never reaches the server or its statement log. (SASLprep is the identity for the
    ASCII passwords this is meant for.)"""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    salt_text, stored, server = (base64.b64encode(b).decode()
                                 for b in (salt, stored_key, server_key))
    return f"SCRAM-SHA-256${iterations}:{salt_text}${stored}:{server}"


def role_passwords(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """The passwords set for the roles in `environ`; in production, a weak one refuses."""
    passwords = {}
    for role, variable in PASSWORD_VARIABLES.items():
        password = environ.get(variable, "")
        if not password:
            continue
        if settings.environment == "production" and (why := weak_secret(password)):
            raise InitRefused(f"{variable} {why}; {MAKE_A_SECRET}. Nothing was changed.")
        passwords[role] = password
    return passwords


def grant_roles(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Create the roles (if missing; idempotent, safe beside a concurrent run in another
    database of the cluster), set the passwords `environ` gives, and make each role's
    privileges exactly `grants()`: every earlier privilege of theirs on these tables and
    their sequences is revoked first, in the same transaction."""
    passwords = role_passwords(settings, os.environ if environ is None else environ)
    with psycopg.connect(settings.require_database_url()) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (DDL_LOCK,))
        for role in ROLES:
            _create_role(conn, role)
        _create_role(conn, STREAM_ROLE, STREAM_ROLE_ATTRIBUTES)
        for role, password in passwords.items():
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(scram_verifier(password))))
            except psycopg.errors.InsufficientPrivilege as e:
                raise InitRefused(
                    f"cannot set the password of role {role} ({e.diag.message_primary}):"
                    " run db init as a role with CREATEROLE, or unset"
                    f" {PASSWORD_VARIABLES[role]} and set it yourself. Nothing was changed."
                ) from None
        schema = sql.Identifier(_one(conn, "SELECT current_schema()"))
        roles = sql.SQL(", ").join(map(sql.Identifier, ALL_ROLES))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, roles))
        for table, by_role in grants().items():
            sequences = [r[0] for r in conn.execute(OWNED_SEQUENCES, (table,)).fetchall()]
            ident = sql.Identifier(table)
            conn.execute(sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(ident, roles))
            for seq in sequences:
                conn.execute(sql.SQL("REVOKE ALL ON SEQUENCE {} FROM {}").format(
                    sql.Identifier(seq), roles))
            for role, privileges in by_role.items():
                conn.execute(sql.SQL("GRANT {} ON TABLE {} TO {}").format(
                    sql.SQL(", ").join(map(sql.SQL, privileges)), ident, sql.Identifier(role)))
                if any(p.startswith("INSERT") for p in privileges):
                    for seq in sequences:  # nextval() only: USAGE, never UPDATE (setval)
                        conn.execute(sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
                            sql.Identifier(seq), sql.Identifier(role)))
        _row_security(conn, schema)


# The sequences of a table's serial and identity columns (nextval on INSERT).
OWNED_SEQUENCES = (
    "SELECT s.relname FROM pg_depend d JOIN pg_class s ON s.oid = d.objid"
    " WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass"
    " AND d.refobjid = %s::regclass AND d.deptype IN ('a', 'i') AND s.relkind = 'S'"
    " ORDER BY s.relname"
)
# A concurrent `db init` in another database may create the same role first: it is a
# cluster-wide name, and the advisory lock above is per database.
_CREATE_ROLE = (
    "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = {name}) THEN"
    " CREATE ROLE {role} " + ROLE_ATTRIBUTES + "; END IF;"
    " EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
)


def _create_role(conn: psycopg.Connection[Any], role: str,
                 attributes: str = ROLE_ATTRIBUTES) -> None:
    try:
        with conn.transaction():
            conn.execute(sql.SQL(_CREATE_ROLE.replace(ROLE_ATTRIBUTES, attributes)).format(
                name=sql.Literal(role), role=sql.Identifier(role)))
    except psycopg.errors.InsufficientPrivilege as e:
        raise InitRefused(
            f"cannot create role {role} ({e.diag.message_primary}): run db init as a role"
            f" with CREATEROLE, or have an administrator run `CREATE ROLE {role}"
            f" {attributes}` first (docs/operations.md, 'Database roles')."
        ) from None
    unsafe = conn.execute(
        "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = %s", (role,)
    ).fetchone()
    if unsafe and unsafe[0]:
        raise InitRefused(
            f"role {role} is a superuser or bypasses row security, so no grant limits it:"
            f" `ALTER ROLE {role} NOSUPERUSER NOBYPASSRLS`, then run db init again."
        )


# -- row-level security -----------------------------------------------------------------
#
# Every read table has row-level security enabled (not forced: db init, replay and the
# other `taskctl` commands run as the owner, whom no policy binds) and exactly these
# policies (`shared.row_security`), any other dropped: the query role sees its
# statement's user's rows, the stream role those of the users with a stream open, the
# projector every row; any other role none. Replay gives the tables it builds the same
# (`projections.replay._copy_row_security`) before its switch.


def row_policies(table: str) -> list[sql.Composed]:
    """The policies `db init` makes on read table `table`."""
    t = sql.Identifier(table)
    return [
        sql.SQL("CREATE POLICY {} ON {} FOR SELECT TO {} USING ({})").format(
            sql.Identifier(USER_POLICY), t, sql.Identifier(QUERY_ROLE), sql.SQL(USER_QUAL)),
        sql.SQL("CREATE POLICY {} ON {} FOR SELECT TO {} USING ({})").format(
            sql.Identifier(STREAMS_POLICY), t, sql.Identifier(STREAM_ROLE), sql.SQL(USERS_QUAL)),
        sql.SQL("CREATE POLICY {} ON {} FOR ALL TO {} USING (true) WITH CHECK (true)").format(
            sql.Identifier(PROJECTOR_POLICY), t, sql.Identifier(PROJECTOR_ROLE)),
    ]


def _row_security(conn: psycopg.Connection[Any], schema: sql.Identifier) -> None:
    """Policies on the read tables, the stream role's membership, the 403 function."""
    for table in table_names(LIVE):
        ident = sql.Identifier(table)
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(ident))
        for (name,) in conn.execute(
            "SELECT polname FROM pg_policy WHERE polrelid = %s::regclass", (table,)
        ).fetchall():
            conn.execute(sql.SQL("DROP POLICY {} ON {}").format(sql.Identifier(name), ident))
        for statement in row_policies(table):
            conn.execute(statement)
    query, streams = sql.Identifier(QUERY_ROLE), sql.Identifier(STREAM_ROLE)
    # Only what is missing, so a db init without CREATEROLE passes once an administrator
    # has made the roles (docs/operations.md, "Database roles").
    row = conn.execute(
        "SELECT r.rolinherit, pg_has_role(%s, %s, 'MEMBER'), pg_has_role(%s, %s, 'USAGE')"
        " FROM pg_roles r WHERE r.rolname = %s",
        (QUERY_ROLE, STREAM_ROLE, QUERY_ROLE, STREAM_ROLE, QUERY_ROLE)).fetchone()
    assert row is not None
    inherits, member, inherited = row
    grant = sql.SQL("GRANT {} TO {}").format(streams, query)
    if conn.info.server_version >= 160000:  # the membership's own options (PostgreSQL 16+)
        grant += sql.SQL(" WITH INHERIT FALSE, SET TRUE")
    try:
        with conn.transaction():
            if inherits:
                conn.execute(sql.SQL("ALTER ROLE {} NOINHERIT").format(query))
            if not member or inherited:
                conn.execute(grant)
    except psycopg.errors.InsufficientPrivilege as e:
        raise InitRefused(
            f"cannot make {QUERY_ROLE} a non-inheriting member of {STREAM_ROLE}"
            f" ({e.diag.message_primary}): run db init as a role with CREATEROLE, or have an"
            f" administrator run `ALTER ROLE {QUERY_ROLE} NOINHERIT; GRANT {STREAM_ROLE} TO"
            f" {QUERY_ROLE}` first (docs/operations.md, 'Database roles')."
        ) from None
    function = sql.Identifier(OWNED_ELSEWHERE_FUNCTION)
    conn.execute(sql.SQL(
        "CREATE OR REPLACE FUNCTION {}(p_user text, p_task uuid) RETURNS boolean"
        " LANGUAGE sql STABLE SECURITY DEFINER SET search_path = {}, pg_temp"
        " AS $$ SELECT EXISTS (SELECT 1 FROM {} WHERE user_id <> p_user AND task_id = p_task) $$"
    ).format(function, schema, sql.Identifier(LIVE.tasks)))
    conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {}(text, uuid) FROM PUBLIC").format(function))
    conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {}(text, uuid) TO {}").format(function, query))


def _one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]
