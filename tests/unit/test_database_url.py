"""`shared.settings.database_url`: another database or user in each URL form libpq takes,
checked by libpq's own parser (psycopg's `conninfo_to_dict`), not by ours.

The benchmark and the tests name their scratch databases and roles with it; before it, a
socket URL with an empty authority (`postgresql:///postgres?host=/run/postgresql`) came
back as `postgresql:/name?...`, which no client parses: the benchmark had created the
database by then, and left it behind.
"""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from shared.settings import database_url, postgres_params

FORMS = [
    # (URL, what libpq reads from it besides dbname and user)
    ("postgresql://app:pw@db.internal:6432/tasks?sslmode=require",
     {"host": "db.internal", "port": "6432", "sslmode": "require"}),
    ("postgresql:///tasks?host=/run/postgresql", {"host": "/run/postgresql"}),
    ("postgresql://app@/tasks?host=/run/postgresql&port=5433",
     {"host": "/run/postgresql", "port": "5433"}),
    ("postgresql://app@%2Frun%2Fpostgresql/tasks", {"host": "/run/postgresql"}),
    ("postgresql://?dbname=tasks&user=app&password=pw&host=/tmp", {"host": "/tmp"}),
    ("postgres://app@[::1]:5432/tasks", {"host": "::1", "port": "5432"}),
]


def _libpq(url: str) -> dict[str, str]:
    return {k: str(v) for k, v in conninfo_to_dict(url).items()}


@pytest.mark.parametrize(("url", "kept"), FORMS)
def test_another_database_keeps_the_rest(url: str, kept: dict[str, str]) -> None:
    before = _libpq(url)
    after = _libpq(database_url(url, dbname="scratch_1"))
    assert after["dbname"] == "scratch_1"
    assert {k: v for k, v in after.items() if k != "dbname"} == {
        k: v for k, v in before.items() if k != "dbname"}
    assert kept.items() <= after.items()
    assert postgres_params(database_url(url, dbname="scratch_1"))["dbname"] == "scratch_1"


@pytest.mark.parametrize(("url", "kept"), FORMS)
def test_another_user_has_no_password(url: str, kept: dict[str, str]) -> None:
    before = _libpq(url)
    after = _libpq(database_url(url, user="taskservice_query"))
    assert after["user"] == "taskservice_query"
    assert "password" not in after
    assert after.get("dbname") == before.get("dbname")
    assert kept.items() <= after.items()


@pytest.mark.parametrize(("url", "kept"), FORMS)
def test_both_at_once(url: str, kept: dict[str, str]) -> None:
    after = _libpq(database_url(url, dbname="other db", user="role name"))
    assert (after["dbname"], after["user"]) == ("other db", "role name")
    assert kept.items() <= after.items()
    params = postgres_params(database_url(url, dbname="other db", user="role name"))
    assert (params["dbname"], params["user"], params["password"]) == ("other db", "role name", "")


def test_an_unchanged_url_reads_the_same() -> None:
    for url, _ in FORMS:
        assert _libpq(database_url(url)) == _libpq(url)
