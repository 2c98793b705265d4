"""Least privilege (issue 18, point 4): `taskctl db init` makes a role per process, and
each can do what its process does and nothing else. On the real PostgreSQL: no role can
UPDATE, DELETE, TRUNCATE, ALTER or DROP the events (nor disable or replace their
trigger, rewrite them with ALTER COLUMN ... USING, or forge their order), while the
command API, the projector and the query API each work as their role; every table of
`shared.catalog` and of an initialised database has its grants; replay (as the owner)
keeps them; and what the owner can still do, `audit --verify`'s digest shows."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import fields

import asyncpg
import psycopg
import pytest
from fastapi.testclient import TestClient

from command_api.store import PostgresEventStore
from projections import audit
from projections.projector import run as run_projector
from projections.projector import safe_bound
from projections.replay import replay
from shared import catalog
from shared.catalog import EVENTS_TABLE, LIVE
from shared.settings import Settings
from taskctl.dbinit import (
    COMMAND_ROLE,
    PASSWORD_VARIABLES,
    PROJECTOR_ROLE,
    QUERY_ROLE,
    ROLES,
    InitRefused,
    grants,
    init_database,
)
from tests.support import TEST_SECRET, PostgresServer, as_role, bearer, new_user
from tests.support.projection import Writer, catch_up
from tests.support.query import codec_for

APPEND_ONLY = "append-only"  # the trigger's message: the roles must be stopped before it



def settings_for(url: str, **extra: object) -> Settings:
    return Settings(environment="test", database_url=url, better_auth_secret=TEST_SECRET,
                    **extra)


@pytest.fixture(scope="module")
def own_db(pg_server: PostgresServer) -> Iterator[str]:
    """A database of its own, initialised like production, with some events."""
    url = pg_server.create_database(prefix="taskservice_roles")
    init_database(settings_for(url), environ={})
    writer = Writer(url)
    try:
        user = new_user()
        for n in range(3):
            writer.change(user, writer.create(user, f"task {n}"), completed=True)
    finally:
        writer.close()
    yield url
    pg_server.drop_database(url)


def events_checksum(url: str) -> tuple[int, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*), md5(string_agg(originator_id::text || originator_version"
            f" || topic || encode(state, 'hex') || tx_id::text || notification_id, ','"
            f" ORDER BY notification_id)) FROM {EVENTS_TABLE}"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


# -- every table has its grants ---------------------------------------------------------


def catalog_tables() -> set[str]:
    """Every table `shared.catalog` names: its `*_TABLE` constants and the live tables."""
    named = {value for name, value in vars(catalog).items()
             if name.endswith("_TABLE") and isinstance(value, str)}
    return named | {getattr(LIVE, f.name) for f in fields(LIVE)}


def test_every_table_the_catalog_names_has_its_grants():
    missing = catalog_tables() - set(grants())
    assert not missing, (f"no grants for {sorted(missing)}: add them to taskctl.dbinit.grants"
                         " (an empty mapping if only the owner may touch it)")
    assert {EVENTS_TABLE, catalog.IDEMPOTENCY_TABLE, catalog.CHECKPOINTS_TABLE} <= set(grants())


def test_every_table_of_an_initialised_database_has_its_grants(own_db: str):
    with psycopg.connect(own_db) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    assert tables == set(grants()), sorted(tables ^ set(grants()))


def test_the_roles_are_plain_roles_owning_nothing(own_db: str):
    with psycopg.connect(own_db) as conn:
        rows = conn.execute(
            "SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolbypassrls,"
            " r.rolreplication, r.rolcanlogin,"
            " (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid)"
            " FROM pg_roles r WHERE r.rolname = ANY(%s) ORDER BY 1", (list(ROLES),)
        ).fetchall()
    assert [r[0] for r in rows] == sorted(ROLES)
    for name, *powers, login, owned in rows:
        assert not any(powers), name
        assert login and owned == 0, name


PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


COLUMN_PRIVILEGES = {"SELECT", "INSERT", "UPDATE", "REFERENCES"}


def held_on(conn: psycopg.Connection, role: str, table: str, privilege: str) -> bool:
    """On the table, or (for the kinds columns have) on any of its columns."""
    query = "SELECT has_table_privilege(%s, %s, %s)"
    if privilege in COLUMN_PRIVILEGES:
        query += " OR has_any_column_privilege(%s, %s, %s)"
    row = conn.execute(query, (role, table, privilege) * (query.count("%s") // 3)).fetchone()
    return bool(row and row[0])


def test_each_role_holds_exactly_its_declared_privileges(own_db: str):
    with psycopg.connect(own_db) as conn:
        for table, by_role in grants().items():
            for role in ROLES:
                declared = {p.split(" ")[0] for p in by_role.get(role, ())}
                held = {p for p in PRIVILEGES if held_on(conn, role, table, p)}
                assert held == declared, (table, role)
    # ... and what is declared for the events is reading and appending, nothing else.
    declared = {p.split(" ")[0] for ps in grants()[EVENTS_TABLE].values() for p in ps}
    assert declared == {"SELECT", "INSERT"}


def test_db_init_takes_back_a_privilege_granted_by_hand(own_db: str):
    with psycopg.connect(own_db, autocommit=True) as conn:
        conn.execute(f"GRANT UPDATE, DELETE ON {EVENTS_TABLE} TO {COMMAND_ROLE}")
        conn.execute(f"GRANT ALL ON {LIVE.tasks} TO {QUERY_ROLE}")
    init_database(settings_for(own_db), environ={})
    with psycopg.connect(own_db) as conn:
        assert conn.execute("SELECT has_table_privilege(%s, %s, 'UPDATE')",
                            (COMMAND_ROLE, EVENTS_TABLE)).fetchone() == (False,)
        assert conn.execute("SELECT has_table_privilege(%s, %s, 'INSERT')",
                            (QUERY_ROLE, LIVE.tasks)).fetchone() == (False,)
        assert conn.execute("SELECT has_table_privilege(%s, %s, 'SELECT')",
                            (QUERY_ROLE, LIVE.tasks)).fetchone() == (True,)


# -- no role can change or destroy the events ------------------------------------------

TRIGGER = f"{EVENTS_TABLE}_no_update_delete"
ATTACKS = {
    "update": f"UPDATE {EVENTS_TABLE} SET topic = topic",
    "delete": f"DELETE FROM {EVENTS_TABLE}",
    "truncate": f"TRUNCATE {EVENTS_TABLE}",
    "alter column using": f"ALTER TABLE {EVENTS_TABLE} ALTER COLUMN state TYPE bytea"
                          " USING state || '\\x20'::bytea",
    "disable trigger": f"ALTER TABLE {EVENTS_TABLE} DISABLE TRIGGER {TRIGGER}",
    "drop trigger": f"DROP TRIGGER {TRIGGER} ON {EVENTS_TABLE}",
    "replace trigger function": "CREATE OR REPLACE FUNCTION taskservice_events_append_only()"
                                " RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    "rename": f"ALTER TABLE {EVENTS_TABLE} RENAME TO tasks_events_gone",
    "drop table": f"DROP TABLE {EVENTS_TABLE}",
    "forge the order": f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic,"
                       " state, tx_id) VALUES (gen_random_uuid(), 1, 'x', '\\x7b7d', '1')",
    "reset the sequence": f"SELECT setval('{EVENTS_TABLE}_notification_id_seq', 1)",
    "skip triggers": "SET session_replication_role = replica",
    "grant itself": f"GRANT UPDATE ON {EVENTS_TABLE} TO CURRENT_USER",
    "create a table": "CREATE TABLE planted (x int)",
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_no_role_can_change_or_destroy_the_events(own_db: str, role: str, attack: str):
    before = events_checksum(own_db)
    with psycopg.connect(as_role(own_db, role)) as conn:
        if attack == "grant itself":
            # GRANT without the grant option is a warning, not an error: look after it.
            conn.execute(ATTACKS[attack])
            assert conn.execute("SELECT has_table_privilege(%s, %s, 'UPDATE')",
                                (role, EVENTS_TABLE)).fetchone() == (False,)
        else:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute(ATTACKS[attack])
            message = str(refused.value)
            # Refused by the privilege system, not left to the trigger.
            assert APPEND_ONLY not in message
            assert "permission denied" in message or "must be owner" in message, message
    assert events_checksum(own_db) == before


# -- each process works as its role -----------------------------------------------------


def test_the_command_api_projector_and_query_api_work_as_their_roles(own_db: str):
    from command_api.app import create_app as command_app
    from query_api.app import create_app as query_app

    user = new_user()
    command = settings_for(as_role(own_db, COMMAND_ROLE), idempotency_purge_interval=0)
    with TestClient(command_app(command), raise_server_exceptions=False) as client:
        auth = bearer(user)
        created = client.post("/api/tasks", json={"title": "as my role"}, headers=auth)
        assert created.status_code == 201, created.text
        task_id = created.json()["data"]["id"]
        keyed = {**auth, "Idempotency-Key": uuid.uuid4().hex}
        first = client.post("/api/tasks", json={"title": "keyed"}, headers=keyed)
        again = client.post("/api/tasks", json={"title": "keyed"}, headers=keyed)
        assert first.status_code == 201 and again.status_code in (200, 201), again.text
        assert again.json()["data"]["id"] == first.json()["data"]["id"]
        changed = client.patch(f"/api/tasks/{task_id}", json={"title": "renamed"},
                               headers={**auth, "If-Match": created.headers["ETag"]})
        assert changed.status_code == 200, changed.text
        completed = client.patch(f"/api/tasks/{task_id}/complete", json={"completed": True},
                                 headers=auth)
        assert completed.status_code == 200, completed.text
        gone = client.delete(f"/api/tasks/{first.json()['data']['id']}", headers=auth)
        assert gone.status_code == 204, gone.text
        position = gone.headers["X-Position"]
        assert client.get("/api/ready").status_code == 200

    async def purge() -> int | None:  # the command role's DELETE of expired keys
        store = await PostgresEventStore.open(command)
        try:
            return await store.purge_idempotency(24)
        finally:
            await store.close()

    assert asyncio.run(purge()) == 0

    async def project() -> None:
        """The live projector as its role (lock, LISTEN, checkpoint, NOTIFY), until the
        read tables reach the last write."""
        stop = asyncio.Event()
        running = asyncio.ensure_future(
            run_projector(as_role(own_db, PROJECTOR_ROLE), poll_interval=0.1, stop=stop))
        owner = await asyncpg.connect(own_db)
        try:
            target = codec_for(own_db).decode(position)
            for _ in range(200):
                row = await owner.fetchrow(
                    f"SELECT tx_id::text, position FROM {LIVE.checkpoints}")
                if row and (int(row[0]), row[1]) >= tuple(target):
                    break
                assert not running.done(), running.exception()
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the projector, as its role, never reached the write")
        finally:
            stop.set()
            await asyncio.wait_for(running, 10)
            await owner.close()

    asyncio.run(project())

    query = settings_for(as_role(own_db, QUERY_ROLE))
    with TestClient(query_app(query), raise_server_exceptions=False) as client:
        auth = {**bearer(user), "X-Min-Position": position}
        listed = client.get("/api/tasks", headers=auth)
        assert listed.status_code == 200, listed.text
        tasks = listed.json()["data"]
        assert [(t["id"], t["title"], t["completed"]) for t in tasks] == [
            (task_id, "renamed", True)]
        history = client.get(f"/api/tasks/{task_id}/history", headers=auth)
        assert history.status_code == 200 and len(history.json()["data"]) == 3, history.text
        stats = client.get("/api/stats", headers=auth)
        assert stats.status_code == 200, stats.text
        assert stats.json()["data"]["total"] == 1
        assert client.get("/api/ready").status_code == 200


def test_the_projector_role_sees_a_command_still_writing(own_db: str):
    """The projector takes only events of transactions older than every running one
    (`projector.SAFE_BOUND`, from pg_stat_activity): as another role it must still see
    the command role's running transaction, or it could pass an event not yet committed."""
    with psycopg.connect(as_role(own_db, COMMAND_ROLE)) as writer:
        writer.execute(
            f"INSERT INTO {EVENTS_TABLE} (originator_id, originator_version, topic, state)"
            " VALUES (%s, 1, 'x', '\\x7b7d')", (uuid.uuid4(),))
        row = writer.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        running = int(row[0])

        async def bound() -> int:
            conn = await asyncpg.connect(as_role(own_db, PROJECTOR_ROLE))
            try:
                async with conn.transaction():
                    return await safe_bound(conn)
            finally:
                await conn.close()

        assert asyncio.run(bound()) <= running
        writer.rollback()


def test_replay_as_the_owner_keeps_the_roles_grants(own_db: str):
    asyncio.run(catch_up(own_db))
    result = asyncio.run(replay(own_db))
    assert result.switched and result.version is not None
    with psycopg.connect(own_db) as conn:
        for table in LIVE.read_tables:
            assert conn.execute(
                "SELECT has_table_privilege(%s, %s, 'SELECT'),"
                " has_table_privilege(%s, %s, 'INSERT'),"
                " has_table_privilege(%s, %s, 'UPDATE, DELETE')",
                (QUERY_ROLE, table, QUERY_ROLE, table, PROJECTOR_ROLE, table),
            ).fetchone() == (True, False, True), table
            owner = conn.execute(
                "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass",
                (table,)).fetchone()
            assert owner is not None and owner[0] not in ROLES
    with psycopg.connect(as_role(own_db, QUERY_ROLE)) as conn:
        conn.execute(f"SELECT count(*) FROM {LIVE.tasks}")


# -- passwords --------------------------------------------------------------------------


def test_db_init_sets_the_passwords_it_is_given_as_scram_verifiers(own_db: str):
    password = "a-test-password-" + uuid.uuid4().hex
    try:
        init_database(settings_for(own_db), environ={PASSWORD_VARIABLES[QUERY_ROLE]: password})
        with psycopg.connect(own_db) as conn:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s",
                               (QUERY_ROLE,)).fetchone()
        assert row is not None and row[0].startswith("SCRAM-SHA-256$4096:")
        # The verifier is the password's: the stored key recomputed from its salt.
        salt, keys = row[0].split("$")[1].split(":")[1], row[0].split("$")[2]
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), 4096)
        client_key = hmac.new(salted, b"Client Key", "sha256").digest()
        assert base64.b64decode(keys.split(":")[0]) == hashlib.sha256(client_key).digest()
    finally:
        with psycopg.connect(own_db, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE {QUERY_ROLE} PASSWORD NULL")


def test_production_refuses_a_weak_role_password_before_changing_anything(own_db: str):
    production = Settings(environment="production", database_url=own_db,
                          better_auth_secret=secrets.token_urlsafe(48))
    with psycopg.connect(own_db, autocommit=True) as conn:
        conn.execute(f"GRANT REFERENCES ON {LIVE.stats} TO {QUERY_ROLE}")
    try:
        for weak in ("replace-with-a-long-random-hex-string", "short", "a" * 40):
            with pytest.raises(InitRefused, match=PASSWORD_VARIABLES[COMMAND_ROLE]):
                init_database(production, environ={PASSWORD_VARIABLES[COMMAND_ROLE]: weak})
        with psycopg.connect(own_db) as conn:  # refused before the grants were redone
            assert held_on(conn, QUERY_ROLE, LIVE.stats, "REFERENCES")
    finally:
        init_database(settings_for(own_db), environ={})


# -- what the owner can still do, and how it shows ------------------------------------


def test_the_owner_can_rewrite_events_and_the_recorded_digest_shows_it(
    pg_server: PostgresServer,
):
    url = pg_server.create_database(prefix="taskservice_roles_tamper")
    try:
        init_database(settings_for(url), environ={})
        writer = Writer(url)
        user = new_user()
        try:
            first = writer.create(user, "before the record")
            asyncio.run(catch_up(url))
            recorded = asyncio.run(audit.verify(url))
            assert recorded.ok and recorded.sealed is not None and recorded.sealed_events == 1
            token = audit.format_digest(recorded.sealed, recorded.digest)
            assert any(token in line for line in recorded.lines())

            # The store grows: the recorded prefix still matches.
            writer.change(user, first, completed=True)
            asyncio.run(catch_up(url))
            later = asyncio.run(audit.verify(url, expect=audit.parse_digest(token)))
            assert later.ok, later.lines()
            assert later.sealed_events == 2 and later.digest != recorded.digest
        finally:
            writer.close()

        # The owner rewrites an event without firing a trigger (ALTER COLUMN ... USING):
        # the privilege system cannot stop the owner; the digest sees it.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                f"ALTER TABLE {EVENTS_TABLE} ALTER COLUMN state TYPE bytea USING CASE"
                " WHEN originator_version = 1 THEN state || '\\x20'::bytea ELSE state END")
        tampered = asyncio.run(audit.verify(url, expect=audit.parse_digest(token)))
        assert not tampered.ok
        assert tampered.tampered and "no longer hash" in tampered.tampered[0]
        assert not (tampered.gaps or tampered.undecodable or tampered.history)
    finally:
        pg_server.drop_database(url)


def test_a_malformed_expected_digest_is_refused():
    with pytest.raises(ValueError, match="not a digest"):
        audit.parse_digest("1234:abc")
    position, digest = audit.parse_digest("12.3:sha256:" + "ab" * 32)
    assert tuple(position) == (12, 3) and digest == "ab" * 32


def test_taskctl_audit_prints_the_digest_and_checks_one(own_db: str):
    def taskctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "taskctl.cli", "audit", *args],
                              env={"DATABASE_URL": own_db, "PATH": ""}, capture_output=True,
                              text=True, timeout=60, check=False)

    asyncio.run(catch_up(own_db))
    printed = taskctl("--verify")
    assert printed.returncode == 0, printed.stderr
    (token,) = re.findall(r"event store digest ([0-9]+\.[0-9]+:[0-9a-f]{64})", printed.stdout)
    checked = taskctl("--expect-digest", token)  # implies --verify
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "recorded earlier matches" in checked.stdout
    position = token.split(":")[0]
    wrong = taskctl("--expect-digest", f"{position}:{'0' * 64}")
    assert wrong.returncode == 1 and "no longer hash" in wrong.stderr
    assert taskctl("--expect-digest", "yesterday's").returncode == 2
