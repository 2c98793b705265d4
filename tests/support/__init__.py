"""Helpers shared by the test tiers: a PostgreSQL server, per-run databases, tokens."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

import psycopg

from shared.auth import mint_token
from shared.eventstore import TaskStore, store_env
from shared.settings import Settings, database_url, postgres_params

TEST_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _local_server() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
    except OSError:
        return None
    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    return url if _reachable(url) else None


class PostgresServer:
    """DATABASE_URL if set, else the machine's server on 127.0.0.1:5432, else (or with
    TASKSERVICE_TEST_PG=embedded) an embedded one (`taskctl.embedded`; as root it runs
    as an unprivileged user) on a free port of 127.0.0.1, in a temporary folder that
    `stop` removes."""

    def __init__(self) -> None:
        self.embedded = None
        self._folder: Path | None = None
        embedded_only = os.environ.get("TASKSERVICE_TEST_PG") == "embedded"
        url = None if embedded_only else os.environ.get("DATABASE_URL") or _local_server()
        if url is None:
            from taskctl.embedded import EmbeddedPostgres

            self._folder = Path(tempfile.mkdtemp(prefix="taskservice-test-pg-"))
            # On 127.0.0.1 as well as its socket: the tests' URL helpers and fault
            # proxies (blackholes, a pooler, a gateway's services) speak TCP.
            from tests.support.process import free_port

            self.embedded = EmbeddedPostgres(self._folder / "postgres", tcp_port=free_port())
            try:
                url = self.embedded.start()
            except BaseException:
                self.stop()
                raise
        self.url = url

    def create_database(self, prefix: str = "taskservice_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return database_url(self.url, dbname=name)

    def drop_database(self, url: str) -> None:
        name = database_name(url)
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def database_name(url: str) -> str:
    return postgres_params(url)["dbname"]


def as_role(url: str, role: str) -> str:
    """The same database, connected as `role` (no password: the test server trusts its
    clients; production gives each role its own, docs/operations.md)."""
    return database_url(url, user=role)


def new_user() -> str:
    """A fresh user id, Better Auth style (32 random characters)."""
    return uuid.uuid4().hex


def bearer(user_id: str, **kwargs: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(TEST_SECRET, user_id, **kwargs)}"}


def library_store(settings: Settings) -> TaskStore:
    """The eventsourcing application on the test database: the library's own writer and
    readers, for tests that write events without the command API or read as the library."""
    return TaskStore(env=store_env(settings))


def unix_socket_url(url: str) -> str:
    """`url` through the server's Unix socket when that socket is on this machine."""
    parts = urlsplit(url)
    if "host=/" in parts.query:
        return url
    with psycopg.connect(url) as conn:
        folders = str(conn.execute("SHOW unix_socket_directories").fetchone()[0])
        port = int(conn.execute("SHOW port").fetchone()[0])
    for folder in (f.strip() for f in folders.split(",")):
        if folder and os.path.exists(os.path.join(folder, f".s.PGSQL.{port}")):
            user = quote(parts.username or "postgres")
            return f"postgresql://{user}@{parts.path}?host={quote(folder)}&port={port}"
    return url
