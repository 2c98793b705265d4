"""Crypto-shredding (`shared.datakeys`, `taskctl users forget`): a user's tasks' text is
sealed in the events with their data key; forgetting them deletes the key and their
rows in one transaction, leaves every event untouched and nothing of theirs readable,
and nothing brings it back (projector, replay, verification, audit)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from fastapi.testclient import TestClient

from command_api.app import create_app as command_app
from query_api.app import create_app as query_app
from shared.catalog import EVENTS_TABLE, PROJECTION, replay_lock
from shared.datakeys import DATA_KEYS_TABLE, SEALED_PREFIX, SEALED_PREFIX_1, ring_for
from shared.events import Task
from tests.support import PostgresServer, bearer, library_store, new_user
from tests.support.projection import catch_up, fresh_database, settings_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def taskctl(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskctl.cli", *args],
        env={"DATABASE_URL": url, "PATH": os.environ.get("PATH", ""), **env},
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def url(pg_server: PostgresServer) -> Iterator[str]:
    url = fresh_database(pg_server)
    yield url
    pg_server.drop_database(url)


@pytest.fixture(scope="module")
def commands(url: str) -> Iterator[TestClient]:
    with TestClient(command_app(settings_for(url)), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def queries(url: str) -> Iterator[TestClient]:
    with TestClient(query_app(settings_for(url)), raise_server_exceptions=False) as client:
        yield client


def marker() -> str:
    """Text that appears nowhere unless we wrote it (lower case: indexes keep lower(title))."""
    return f"zq{secrets.token_hex(8)}"


def create(client: TestClient, user: str, **body: Any) -> dict[str, Any]:
    response = client.post("/api/tasks", json=body, headers=bearer(user))
    assert response.status_code == 201, response.text
    return response.json()["data"]


def traces(url: str, text: str) -> list[str]:
    """Every place in the database where `text` can be read: any row of any table, and
    any tuple on any heap or B-tree page (dead row versions and index keys included)."""
    found = []
    needle = text.encode()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        relations = conn.execute(
            "SELECT c.oid::regclass::text, c.relkind, c.relpages FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND c.relkind IN ('r', 't', 'i', 'm') AND c.relpersistence = 'p'"
        ).fetchall()
        for name, kind, _ in relations:
            if kind in ("r", "m") and conn.execute(
                f"SELECT count(*) FROM {name} t WHERE t::text LIKE %s", (f"%{text}%",)
            ).fetchone()[0]:
                found.append(f"a row of {name}")
            pages = conn.execute("SELECT pg_relation_size(%s::regclass) / 8192",
                                 (name,)).fetchone()[0]
            am = conn.execute("SELECT a.amname FROM pg_class c LEFT JOIN pg_am a"
                              " ON a.oid = c.relam WHERE c.oid = %s::regclass", (name,)).fetchone()[0]
            for page in range(pages):
                if kind in ("r", "t", "m"):
                    items = conn.execute(
                        "SELECT t_data FROM heap_page_items(get_raw_page(%s, %s))"
                        " WHERE t_data IS NOT NULL", (name, page)).fetchall()
                elif am == "btree" and page > 0:  # page 0 is the metapage
                    items = conn.execute(
                        "SELECT decode(replace(data, ' ', ''), 'hex')"
                        " FROM bt_page_items(get_raw_page(%s, %s))", (name, page)).fetchall()
                else:
                    continue
                if any(needle in bytes(item[0]) for item in items if item[0] is not None):
                    found.append(f"a tuple on page {page} of {name}")
    return found


def events_digest(url: str) -> str:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f"SELECT notification_id, originator_id, originator_version, topic, state, tx_id::text"
            f" FROM {EVENTS_TABLE} ORDER BY notification_id").fetchall()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def keys_of(url: str, user: str) -> set[uuid.UUID]:
    with psycopg.connect(url) as conn:
        return {r[0] for r in conn.execute(
            f"SELECT key_id FROM {DATA_KEYS_TABLE} WHERE user_id = %s", (user,)).fetchall()}


async def test_the_text_is_sealed_in_the_events_and_the_library_still_reads_them(
    url: str, commands: TestClient, queries: TestClient
) -> None:
    user, title, tag = new_user(), marker(), marker()
    task = create(commands, user, title=title, description="about " + title, tags=[tag])
    with psycopg.connect(url) as conn:
        stored = conn.execute(f"SELECT state FROM {EVENTS_TABLE} WHERE originator_id = %s",
                              (task["id"],)).fetchone()[0]
    assert title.encode() not in stored and tag.encode() not in stored
    state = json.loads(stored)
    assert state["title"].startswith(SEALED_PREFIX) and state["owner"] == user
    # The library reads our event: every field but the sealed ones as it was.
    store = library_store(settings_for(url))
    try:
        read = store.repository.get(uuid.UUID(task["id"]))
    finally:
        store.close()
    assert isinstance(read, Task) and read.owner == user and read.completed is False
    assert read.title.startswith(SEALED_PREFIX) and read.tags[0].startswith(SEALED_PREFIX)
    # Everyone else sees it open.
    await catch_up(url)
    got = queries.get(f"/api/tasks/{task['id']}", headers=bearer(user))
    assert got.status_code == 200, got.text
    assert got.json()["data"]["title"] == title and got.json()["data"]["tags"] == [tag]
    changed = commands.patch(f"/api/tasks/{task['id']}", json={"title": title + " two"},
                             headers={**bearer(user), "If-Match": got.headers["ETag"]})
    assert changed.status_code == 200 and changed.json()["data"]["title"] == title + " two"


async def test_forget_leaves_no_trace_and_nothing_brings_it_back(
    url: str, commands: TestClient, queries: TestClient
) -> None:
    user, other = new_user(), new_user()
    title, description, tag = marker(), marker(), marker()
    kept = create(commands, user, title=title, description=description, tags=[tag, "home"])
    second = create(commands, user, title=title + " b")
    done = commands.patch(f"/api/tasks/{second['id']}", json={"completed": True},
                          headers={**bearer(user), "Idempotency-Key": "erase-me-1"})
    assert done.status_code == 200, done.text
    theirs = create(commands, other, title="other's " + marker())
    await catch_up(url)
    exported = taskctl(url, "users", "export", user)
    assert exported.returncode == 0, exported.stderr
    assert title in exported.stdout and tag in exported.stdout  # the right of access
    old_keys = keys_of(url, user)
    assert old_keys
    assert traces(url, title) and traces(url, tag)  # the read tables hold them, open
    before = events_digest(url)
    others_list = queries.get("/api/tasks", headers=bearer(other)).json()["data"]

    out = taskctl(url, "users", "forget", user, "--json")

    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["erased"] and report["keys_deleted"] == len(old_keys)
    assert report["tasks"] == 2 and report["events_kept"] == 3
    assert report["idempotency_keys_deleted"] == 1
    assert events_digest(url) == before  # not one event touched
    for text in (title, description, tag):
        assert traces(url, text) == []
    # The audit shows their events, erased.
    audit = taskctl(url, "audit", "--user", user, "--json")
    assert audit.returncode == 0, audit.stderr
    records = [json.loads(line) for line in audit.stdout.splitlines()]
    assert len(records) == 3 and all(r["erased"] for r in records)
    assert all(r["data"].get("title") is None for r in records)
    assert title not in audit.stdout
    # Their tokens find nothing; their old tasks are gone for commands too.
    assert queries.get("/api/tasks", headers=bearer(user)).json()["data"] == []
    assert queries.get(f"/api/tasks/{kept['id']}", headers=bearer(user)).status_code == 404
    assert commands.patch(f"/api/tasks/{kept['id']}", json={"title": "back"},
                          headers=bearer(user)).status_code == 404
    # The projector, the verification and a replay pass and resurrect nothing.
    await catch_up(url)
    verified = taskctl(url, "audit", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    replayed = taskctl(url, "replay", "--json")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    for text in (title, description, tag):
        assert traces(url, text) == []
    assert queries.get("/api/tasks", headers=bearer(user)).json()["data"] == []
    # Others are untouched.
    assert queries.get("/api/tasks", headers=bearer(other)).json()["data"] == others_list
    assert queries.get(f"/api/tasks/{theirs['id']}", headers=bearer(other)).status_code == 200
    # The same user id starts again with a new key (the command API had the old one cached).
    again = create(commands, user, title="a new start")
    await catch_up(url)
    new_keys = keys_of(url, user)
    assert new_keys and not new_keys & old_keys
    listed = queries.get("/api/tasks", headers=bearer(user)).json()["data"]
    assert [t["id"] for t in listed] == [again["id"]]


async def test_events_not_yet_projected_when_forgotten_are_never_projected(
    url: str, commands: TestClient, queries: TestClient
) -> None:
    await catch_up(url)
    user, title = new_user(), marker()
    task = create(commands, user, title=title)
    commands.patch(f"/api/tasks/{task['id']}", json={"completed": True}, headers=bearer(user))
    commands.patch(f"/api/tasks/{task['id']}", json={"priority": "high"}, headers=bearer(user))

    out = taskctl(url, "users", "forget", user)

    assert out.returncode == 0, out.stderr
    await catch_up(url)  # the projector skips their three events, and stops at none
    assert queries.get("/api/tasks", headers=bearer(user)).json()["data"] == []
    assert traces(url, title) == []


def test_forget_refuses_a_user_with_events_stored_before_sealing(url: str) -> None:
    user = new_user()
    store = library_store(settings_for(url))  # the library writes fields as they are
    try:
        task = Task.create(owner=user, title="legacy " + marker(), description=None,
                           actor=user, request_id="legacy-1")
        store.save(task)
    finally:
        store.close()
    before = events_digest(url)

    out = taskctl(url, "users", "forget", user, "--json")

    assert out.returncode == 4
    report = json.loads(out.stdout)
    assert report["legacy_tasks"] == 1 and not report["erased"]
    assert "repair procedure" in report["problem"]
    assert events_digest(url) == before


async def test_events_sealed_in_the_first_format_open_and_are_forgotten(
    url: str, commands: TestClient, queries: TestClient
) -> None:
    """Events written before the key ref (`sealed:1:<base64(key id, nonce, sealed)>`)
    stay readable and forgettable: nothing stored needs migrating."""
    user = new_user()
    create(commands, user, title=marker())  # the user's data key, made by their first command
    conn = await asyncpg.connect(url)
    try:
        ring = await ring_for(conn)
        await ring.load_all(conn)
    finally:
        await conn.close()
    key = next(k for k in ring.keys.values() if k.user_id == user)
    title = "first format " + marker()
    nonce = os.urandom(12)
    sealed = SEALED_PREFIX_1 + base64.b64encode(
        key.key_id.bytes + nonce + key.aead.encrypt(nonce, title.encode(), b"title")).decode()
    store = library_store(settings_for(url))
    try:
        store.save(Task.create(owner=user, title=sealed, description=None, actor=user,
                               request_id="first-format-1"))
    finally:
        store.close()
    await catch_up(url)
    listed = queries.get("/api/tasks", headers=bearer(user)).json()["data"]
    assert title in {t["title"] for t in listed} and len(listed) == 2

    out = taskctl(url, "users", "forget", user, "--json")

    assert out.returncode == 0, out.stderr  # sealed, not "legacy"
    assert json.loads(out.stdout)["legacy_tasks"] == 0
    await catch_up(url)
    assert queries.get("/api/tasks", headers=bearer(user)).json()["data"] == []
    assert traces(url, title) == []


def test_forget_waits_for_no_replay(url: str, commands: TestClient) -> None:
    user = new_user()
    create(commands, user, title=marker())
    with psycopg.connect(url) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))",
                     (replay_lock(PROJECTION),))
        out = taskctl(url, "users", "forget", user)
        conn.execute("SELECT pg_advisory_unlock_all()")
    assert out.returncode == 3, out.stderr
    assert "replay is running" in out.stderr
    assert keys_of(url, user)


async def test_rotating_the_master_key_and_a_users_key(pg_server: PostgresServer) -> None:
    url = fresh_database(pg_server)
    try:
        user, title = new_user(), marker()
        with TestClient(command_app(settings_for(url)), raise_server_exceptions=False) as c:
            first = create(c, user, title=title)
        new_master = secrets.token_urlsafe(32)
        refused = taskctl(url, "keys", "rotate-master")
        assert refused.returncode == 2 and "DATA_MASTER_KEY" in refused.stderr
        rotated = taskctl(url, "keys", "rotate-master", DATA_MASTER_KEY=new_master)
        assert rotated.returncode == 0, rotated.stderr
        with psycopg.connect(url) as conn:
            conn.execute("DELETE FROM dev_master_key")  # the old key is gone for good
        assert taskctl(url, "users", "rotate-key", user,
                       DATA_MASTER_KEY=new_master).returncode == 0
        assert len(keys_of(url, user)) == 2
        settings = settings_for(url).model_copy(update={"data_master_key": new_master})
        with TestClient(command_app(settings), raise_server_exceptions=False) as c:
            # Sealed before the rotation, opened after it; a new event uses the new key.
            renamed = c.patch(f"/api/tasks/{first['id']}", json={"title": title + " 2"},
                              headers=bearer(user))
            assert renamed.status_code == 200, renamed.text
            assert renamed.json()["data"]["title"] == title + " 2"
        os.environ["DATA_MASTER_KEY"] = new_master  # what the projector's ring reads
        try:
            from shared.datakeys import _RINGS

            _RINGS.clear()
            await catch_up(url)
        finally:
            del os.environ["DATA_MASTER_KEY"]
            _RINGS.clear()
        exported = taskctl(url, "export", "--user", user, DATA_MASTER_KEY=new_master)
        assert exported.returncode == 0, exported.stderr
        assert title + " 2" in exported.stdout
    finally:
        pg_server.drop_database(url)


async def test_the_benchmarks_unsealed_store_stores_the_fields_open(url: str) -> None:
    """bench/unsealed_store.py's "without": the same store with `sealing` off."""
    from command_api.store import PostgresEventStore

    store = await PostgresEventStore.open(settings_for(url))
    store.sealing = False
    try:
        user, title = new_user(), marker()
        one = Task.create(owner=user, title=title, description=None, actor=user,
                          request_id="open-1")
        many = [Task.create(owner=user, title=f"{title} {i}", description=None, actor=user,
                            request_id=f"open-{i}") for i in range(2, 6)]
        for task in many:
            task.change(actor=user, request_id="two", completed=True)  # two events: arrays
        assert (await store.save(one))[0] == 1  # one event: the batched append
        assert [n for n, _ in [await store.save(t) for t in many]] == [2] * 4
        assert keys_of(url, user) == set()  # no key was made
        with psycopg.connect(url) as conn:
            states = [bytes(r[0]) for r in conn.execute(
                f"SELECT state FROM {EVENTS_TABLE} WHERE originator_id = ANY(%s)",
                ([t.id for t in [one, *many]],)).fetchall()]
        assert len(states) == 9 and sum(title.encode() in s for s in states) == 5
        assert (await store.get(one.id)).title == title
    finally:
        await store.close()
