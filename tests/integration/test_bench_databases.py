"""The benchmark's scratch databases (`bench.data.Databases`) through a Unix socket URL,
the form `python -m bench --pg-url` gets for a server that listens on no TCP port (the
embedded one's), with a user in the authority or none at all (`postgresql:///postgres?
host=/run/postgresql`, which the benchmark once turned into a URL no client parses):
created, reachable under the URL it hands back, and dropped, none left.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import psycopg
import pytest

from bench.data import Databases
from tests.support import PostgresServer, unix_socket_url


def _exists(admin_url: str, name: str) -> bool:
    with psycopg.connect(admin_url) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (name,)).fetchone() is not None


def _without_authority(url: str) -> str:
    """The same URL with its user in the query and nothing between `//` and the path."""
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, f"user={parts.username or 'postgres'}") if q)
    return f"{parts.scheme}://{parts.path}?{query}"


@pytest.mark.parametrize("form", ["as configured", "no authority"])
def test_scratch_databases_over_a_socket_url(pg_server: PostgresServer, form: str) -> None:
    admin = unix_socket_url(pg_server.url)
    if form == "no authority":
        admin = _without_authority(admin)
        with psycopg.connect(admin):
            pass  # libpq reads it
    databases = Databases(admin, prefix="taskservice_test_benchdb")
    try:
        url = databases.create("store")
        with psycopg.connect(url) as conn:
            name = str(conn.execute("SELECT current_database()").fetchone()[0])
        assert name == f"{databases.prefix}_store"
        assert _exists(admin, name)
    finally:
        databases.drop_all()
    assert databases.created == []
    assert not _exists(admin, name)
