"""Isolation, as a property: random sequences of every command and every query, by
three users at once, against the real command app and query app (in-process, on a
database of this module's own), compared with a small in-memory model.

Every response is checked against the model (status, task fields, totals, history
entries, feed pages, counts) and for leaks: no body, header or error message answered
to one user ever names another user, another user's task id, title, description or
request id (each user's titles, descriptions and request ids carry their user id, so
one substring check covers them all).

Bounded for CI (15 examples of 25 steps, derandomized); ISOLATION_EXAMPLES and
ISOLATION_STEPS set a longer run, with fresh random examples;
a longer run: `ISOLATION_EXAMPLES=200 pytest tests/integration/test_isolation_property.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.support import PostgresServer, bearer, new_user
from tests.support.projection import catch_up, fresh_database, settings_for

EXAMPLES = int(os.environ.get("ISOLATION_EXAMPLES", "15"))
STEPS = int(os.environ.get("ISOLATION_STEPS", "25"))
USERS = 3
KEYS = ("k1", "k2", "k3")  # shared by every user: an Idempotency-Key is per user
TOPICS = ("TaskCreated", "TaskTitleChanged", "TaskDescriptionChanged", "TaskCompleted",
          "TaskReopened", "TaskDeleted")
SORTS = ("created_at", "-created_at", "updated_at", "-updated_at", "title", "-title")

# ASCII only: the databases use C collation, where lower() and byte order agree with Python.
words = st.text(alphabet="abcXYZ019 %_", min_size=0, max_size=8)
maybe_key = st.one_of(st.none(), st.sampled_from(KEYS))
if_match_kind = st.sampled_from(["none", "none", "*", "current", "weak", "stale", "garbage"])

FIGURES: Counter[str] = Counter()


# -- the model --------------------------------------------------------------------------


@dataclass
class MTask:
    id: str
    owner: str
    title: str
    description: str | None
    completed: bool = False
    version: int = 1
    created_at: str = ""
    updated_at: str = ""
    deleted: bool = False

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id, "user_id": self.owner, "title": self.title,
            "description": self.description, "completed": self.completed,
            "priority": "medium", "tags": [], "due_date": None,  # never set by this model
            "created_at": self.created_at, "updated_at": self.updated_at, "version": self.version,
        }


@dataclass
class MEvent:
    task_id: str
    version: int
    type: str
    actor: str
    request_id: str
    changes: dict[str, Any]

    def view(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "version": self.version, "type": self.type,
                "actor": self.actor, "request_id": self.request_id, "changes": self.changes}


@dataclass
class Recorded:
    """What the first successful request with an Idempotency-Key answered."""

    fingerprint: str
    status: int
    task: dict[str, Any] | None


@dataclass
class Expected:
    status: int
    task: dict[str, Any] | None = None
    replay: bool = False


class Refused(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


def fingerprint(method: str, path: str, body: Any) -> str:
    return hashlib.sha256(
        json.dumps([method, path.rstrip("/"), body], sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


@dataclass
class Model:
    users: list[str]
    tasks: dict[str, MTask] = field(default_factory=dict)  # every task ever created, by id
    events: dict[str, list[MEvent]] = field(default_factory=dict)  # per user, in order
    keys: dict[tuple[str, str], Recorded] = field(default_factory=dict)

    def live(self, user: str) -> list[MTask]:
        return [t for t in self.tasks.values() if t.owner == user and not t.deleted]

    def emit(self, task: MTask, topic: str, actor: str, rid: str, changes: dict[str, Any]) -> None:
        self.events.setdefault(task.owner, []).append(
            MEvent(task.id, task.version, topic, actor, rid, changes)
        )

    def load(self, user: str, task_id: str) -> MTask:
        task = self.tasks.get(task_id)
        if task is None or task.deleted:
            raise Refused(404)
        if task.owner != user:
            raise Refused(403)
        return task

    def change(self, task: MTask, actor: str, rid: str, *, title: str | None = None,
               description: Any = ..., completed: bool | None = None) -> int:
        """Apply a change as the aggregate decides it; the number of events."""
        before = len(self.events.get(task.owner, []))
        if title is not None and title != task.title:
            task.version += 1
            self.emit(task, "TaskTitleChanged", actor, rid, {"title": {"from": task.title, "to": title}})
            task.title = title
        if description is not ... and description != task.description:
            task.version += 1
            self.emit(task, "TaskDescriptionChanged", actor, rid,
                      {"description": {"from": task.description, "to": description}})
            task.description = description
        if completed is True and not task.completed:
            task.version += 1
            self.emit(task, "TaskCompleted", actor, rid, {"completed": {"from": False, "to": True}})
            task.completed = True
        elif completed is False and task.completed:
            task.version += 1
            self.emit(task, "TaskReopened", actor, rid, {"completed": {"from": True, "to": False}})
            task.completed = False
        return len(self.events.get(task.owner, [])) - before


def check_if_match(header: str | None, version: int) -> None:
    if header is None or header == "*":
        return
    accepted = {f'"v{version}"', f'W/"v{version}"'}
    if not any(part.strip() in accepted for part in header.split(",")):
        raise Refused(412)


# -- the machine ------------------------------------------------------------------------


class Isolation(RuleBasedStateMachine):
    command: TestClient
    query: TestClient
    database_url: str

    def __init__(self) -> None:
        super().__init__()
        self.model = Model(users=[])
        self.dirty = False
        self.last_position: str | None = None
        self.n = 0
        self.retries: dict[str, Any] = {}

    @initialize()
    def users(self) -> None:
        self.model.users = [new_user() for _ in range(USERS)]
        FIGURES["examples"] += 1
        for u in range(USERS):  # a task each to start with, so commands find targets
            self.create(u, "tasks", "first", None, None)

    # -- helpers ----------------------------------------------------------------------

    def rid(self, user: str) -> str:
        self.n += 1
        return f"{user}-{self.n}"

    def send(self, client: TestClient, user: str, method: str, path: str, *, json_body: Any = None,
             params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
             rid: str | None = None) -> Any:
        hdrs = {**bearer(user), "X-Request-ID": rid or self.rid(user), **(headers or {})}
        kwargs: dict[str, Any] = {"headers": hdrs, "params": params}
        if json_body is not None:
            kwargs["json"] = json_body
        response = client.request(method, path, **kwargs)
        FIGURES["requests"] += 1
        FIGURES[f"status {response.status_code}"] += 1
        self.no_leak(user, response)
        return response

    def no_leak(self, user: str, response: Any) -> None:
        text = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        for other in self.model.users:
            if other != user:
                assert other not in text, f"user {other} leaked to {user}: {text}"
        for task in self.model.tasks.values():
            if task.owner != user:
                assert task.id not in text, f"task {task.id} of {task.owner} leaked to {user}: {text}"

    def pick_user(self, i: int) -> str:
        return self.model.users[i % USERS]

    def pick_task(self, user: str, i: int) -> str:
        """Mostly one of the user's own tasks (deleted ones too), else another user's,
        else one that never existed."""
        own = sorted(t.id for t in self.model.tasks.values() if t.owner == user)
        others = sorted(t.id for t in self.model.tasks.values() if t.owner != user)
        kind, i = i % 10, i // 10
        if kind < 6 and own:
            return own[i % len(own)]
        if kind < 9 and others:
            return others[i % len(others)]
        return str(uuid.UUID(int=i * 7919 + 1))

    def path_user(self, user: str, other: bool) -> str:
        if not other:
            return user
        return next(u for u in self.model.users if u != user)

    def if_match(self, kind: str, task_id: str) -> str | None:
        task = self.model.tasks.get(task_id)
        version = task.version if task else 1
        return {
            "none": None, "*": "*", "current": f'"v{version}"', "weak": f'W/"v{version}"',
            "stale": f'"v{version + 1}"', "garbage": "not-an-etag",
        }[kind]

    def run(self, user: str, key: str | None, fp: str, path_other: bool, execute: Any) -> Expected:
        """The model's answer: 403 on another user's path first, then the key's replay,
        then the command itself (a key is recorded only when the command succeeds)."""
        if path_other:
            return Expected(403)
        if key is not None:
            recorded = self.model.keys.get((user, key))
            if recorded is not None:
                if recorded.fingerprint != fp:
                    return Expected(422)
                return Expected(recorded.status, recorded.task, replay=True)
        try:
            expected = execute()
        except Refused as e:
            return Expected(e.status)
        if key is not None:
            self.model.keys[(user, key)] = Recorded(fp, expected.status, expected.task)
        return expected

    def check_command(self, response: Any, expected: Expected, task: MTask | None,
                      changed: int = 0) -> None:
        body = response.text
        assert response.status_code == expected.status, (expected, body)
        if expected.status >= 400:
            error = response.json()["error"]
            codes = {403: "FORBIDDEN", 404: "NOT_FOUND", 412: "PRECONDITION_FAILED",
                     422: "VALIDATION_ERROR"}
            assert error["code"] == codes[expected.status], body
            return
        FIGURES["commands ok"] += 1
        if expected.replay:
            FIGURES["replays"] += 1
        self.last_position = response.headers["X-Position"]
        if expected.status == 204:
            assert body == ""
            return
        got = response.json()["data"]
        if not expected.replay and task is not None:
            # Timestamps come from the server: created_at once, updated_at when events were made.
            if not task.created_at:
                task.created_at = task.updated_at = got["created_at"]
            elif changed:
                assert at(got["updated_at"]) >= at(task.updated_at)
                task.updated_at = got["updated_at"]
            expected.task = task.view()
        assert got == expected.task, (got, expected.task)
        assert response.headers["ETag"] == f'"v{got["version"]}"'

    # -- commands ---------------------------------------------------------------------

    @rule(u=st.integers(0, 2), contract=st.sampled_from(["tasks", "user", "other"]),
          text=words, desc=st.one_of(st.none(), words), key=maybe_key)
    def create(self, u: int, contract: str, text: str, desc: str | None, key: str | None) -> None:
        user = self.pick_user(u)
        if key is not None:
            self.retries[user] = lambda: self.create(u, contract, text, desc, key)
        title = f"{text} {user}".strip()
        description = None if desc is None else f"{desc} {user}"
        path = "/api/tasks" if contract == "tasks" else f"/api/{self.path_user(user, contract == 'other')}/tasks"
        rid = self.rid(user)
        created: dict[str, MTask] = {}

        def execute() -> Expected:
            created["t"] = MTask("", user, title, description)
            return Expected(201)

        fp = fingerprint("POST", path, {"title": title, "description": description})
        expected = self.run(user, key, fp, contract == "other", execute)
        response = self.send(self.command, user, "POST", path,
                             json_body={"title": f"{text} {user}", "description": description},
                             headers={"Idempotency-Key": key} if key else None, rid=rid)
        task = created.get("t")
        if task is not None and response.status_code == 201:
            task.id = response.json()["data"]["id"]
            assert task.id not in self.model.tasks
            self.model.tasks[task.id] = task
            self.model.emit(task, "TaskCreated", user, rid, {
                "title": {"from": None, "to": title},
                "description": {"from": None, "to": description},
                "completed": {"from": None, "to": False},
            })
            self.dirty = True
        self.check_command(response, expected, task)
        if task is not None and key is not None and response.status_code == 201:
            self.model.keys[(user, key)].task = task.view()

    @rule(u=st.integers(0, 2), t=st.integers(0, 10**6), title=st.one_of(st.none(), words),
          desc=st.one_of(st.just(...), st.none(), words), completed=st.one_of(st.none(), st.booleans()),
          im=if_match_kind, key=maybe_key)
    def patch(self, u: int, t: int, title: str | None, desc: Any, completed: bool | None,
              im: str, key: str | None) -> None:
        user, task_id = self.pick_user(u), self.pick_task(self.pick_user(u), t)
        body: dict[str, Any] = {}
        if title is not None:
            body["title"] = f"{title} {user}"
        if desc is not ...:
            body["description"] = None if desc is None else f"{desc} {user}"
        if completed is not None:
            body["completed"] = completed
        wire = dict(body)
        if "title" in body:
            body["title"] = body["title"].strip()
        self._change(user, "PATCH", f"/api/tasks/{task_id}", task_id, wire, body, im, key, False,
                     lambda task, rid: self.model.change(
                         task, user, rid, title=body.get("title"),
                         description=body.get("description", ...), completed=body.get("completed")))

    @rule(u=st.integers(0, 2), t=st.integers(0, 10**6), other=st.booleans(), title=words,
          desc=st.one_of(st.just(...), st.none(), words), completed=st.one_of(st.none(), st.booleans()),
          im=if_match_kind, key=maybe_key)
    def put(self, u: int, t: int, other: bool, title: str, desc: Any, completed: bool | None,
            im: str, key: str | None) -> None:
        user, task_id = self.pick_user(u), self.pick_task(self.pick_user(u), t)
        body: dict[str, Any] = {"title": f"{title} {user}"}
        if desc is not ...:
            body["description"] = None if desc is None else f"{desc} {user}"
        if completed is not None:
            body["completed"] = completed
        wire = dict(body)
        body["title"] = body["title"].strip()
        path = f"/api/{self.path_user(user, other)}/tasks/{task_id}"
        self._change(user, "PUT", path, task_id, wire, body, im, key, other,
                     lambda task, rid: self.model.change(
                         task, user, rid, title=body["title"],
                         description=body.get("description"), completed=body.get("completed")))

    @rule(u=st.integers(0, 2), t=st.integers(0, 10**6), other=st.booleans(),
          completed=st.one_of(st.just(...), st.booleans()), im=if_match_kind, key=maybe_key)
    def toggle(self, u: int, t: int, other: bool, completed: Any, im: str, key: str | None) -> None:
        user, task_id = self.pick_user(u), self.pick_task(self.pick_user(u), t)
        wire = None if completed is ... else {"completed": completed}
        target = None if completed is ... else completed
        path = f"/api/{self.path_user(user, other)}/tasks/{task_id}/complete"
        self._change(user, "PATCH", path, task_id, wire, {"completed": target}, im, key, other,
                     lambda task, rid: self.model.change(
                         task, user, rid,
                         completed=(not task.completed) if target is None else target))

    @rule(u=st.integers(0, 2), t=st.integers(0, 10**6), contract=st.sampled_from(["tasks", "user", "other"]),
          im=if_match_kind, key=maybe_key)
    def delete(self, u: int, t: int, contract: str, im: str, key: str | None) -> None:
        user, task_id = self.pick_user(u), self.pick_task(self.pick_user(u), t)
        path = (f"/api/tasks/{task_id}" if contract == "tasks"
                else f"/api/{self.path_user(user, contract == 'other')}/tasks/{task_id}")

        def remove(task: MTask, rid: str) -> int:
            task.version += 1
            self.model.emit(task, "TaskDeleted", user, rid, {})
            task.deleted = True
            return 1

        self._change(user, "DELETE", path, task_id, None, None, im, key, contract == "other", remove,
                     status=204)

    def _change(self, user: str, method: str, path: str, task_id: str, wire: Any, fp_body: Any,
                im: str, key: str | None, path_other: bool, apply: Any, status: int = 200) -> None:
        if key is not None:
            self.retries[user] = lambda: self._change(user, method, path, task_id, wire, fp_body, im,
                                                      key, path_other, apply, status)
        rid = self.rid(user)
        if_match = self.if_match(im, task_id)
        outcome: dict[str, Any] = {}

        def execute() -> Expected:
            task = self.model.load(user, task_id)
            check_if_match(if_match, task.version)
            outcome["task"] = task
            outcome["changed"] = apply(task, rid)
            return Expected(status, None if status == 204 else task.view())

        expected = self.run(user, key, fingerprint(method, path, fp_body), path_other, execute)
        headers = {}
        if if_match is not None:
            headers["If-Match"] = if_match
        if key is not None:
            headers["Idempotency-Key"] = key
        response = self.send(self.command, user, method, path, json_body=wire, headers=headers, rid=rid)
        if outcome.get("changed"):
            self.dirty = True
        self.check_command(response, expected, outcome.get("task"), outcome.get("changed", 0))
        if key is not None and not expected.replay and expected.status == 200:
            self.model.keys[(user, key)].task = response.json()["data"]

    @rule(u=st.integers(0, 2))
    def retry(self, u: int) -> None:
        """The user's last request with an Idempotency-Key, sent again as it was."""
        again = self.retries.get(self.pick_user(u))
        if again is not None:
            FIGURES["retries"] += 1
            again()

    # -- queries ----------------------------------------------------------------------

    def read(self, user: str, path: str, params: dict[str, Any] | None = None) -> Any:
        if self.dirty:
            asyncio.run(catch_up(self.database_url))
            self.dirty = False
        headers = {}
        if self.last_position and self.n % 2:
            headers["X-Min-Position"] = self.last_position
        response = self.send(self.query, user, "GET", path, params=params, headers=headers)
        if response.status_code == 200:
            FIGURES["reads ok"] += 1
            if headers:
                assert response.json()["meta"]["stale"] is False, response.text
        return response

    def expect_error(self, response: Any, status: int) -> None:
        assert response.status_code == status, response.text
        code = {403: "FORBIDDEN", 404: "NOT_FOUND"}[status]
        assert response.json()["error"]["code"] == code, response.text

    @rule(u=st.integers(0, 2), contract=st.sampled_from(["tasks", "user", "user", "other"]),
          status=st.sampled_from(["all", "pending", "completed", None]),
          q=st.one_of(st.none(), st.text(alphabet="abcXYZ019 %_", min_size=1, max_size=3)),
          sort=st.one_of(st.none(), st.sampled_from(SORTS)),
          limit=st.one_of(st.none(), st.integers(1, 5)), offset=st.one_of(st.none(), st.integers(0, 4)))
    def list_tasks(self, u: int, contract: str, status: str | None, q: str | None, sort: str | None,
                   limit: int | None, offset: int | None) -> None:
        user = self.pick_user(u)
        path = "/api/tasks" if contract == "tasks" else f"/api/{self.path_user(user, contract == 'other')}/tasks"
        params = {k: v for k, v in {"status": status, "q": q, "sort": sort, "limit": limit,
                                    "offset": offset}.items() if v is not None}
        response = self.read(user, path, params)
        if contract == "other":
            self.expect_error(response, 403)
            return
        tasks = self.model.live(user)
        if status == "pending":
            tasks = [t for t in tasks if not t.completed]
        elif status == "completed":
            tasks = [t for t in tasks if t.completed]
        if q:
            needle = q.lower()
            tasks = [t for t in tasks if needle in t.title.lower() or needle in (t.description or "").lower()]
        tasks = sort_tasks(tasks, sort or "-created_at")
        total = len(tasks)
        start = offset or 0
        page = tasks[start:start + limit] if limit is not None else tasks[start:]
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["data"] == [t.view() for t in page], (params, body["data"], [t.view() for t in page])
        assert body["meta"]["total"] == total

    @rule(u=st.integers(0, 2), t=st.integers(0, 10**6), contract=st.sampled_from(["tasks", "user", "other"]))
    def get_task(self, u: int, t: int, contract: str) -> None:
        user, task_id = self.pick_user(u), self.pick_task(self.pick_user(u), t)
        path = (f"/api/tasks/{task_id}" if contract == "tasks"
                else f"/api/{self.path_user(user, contract == 'other')}/tasks/{task_id}")
        response = self.read(user, path)
        if contract == "other":
            return self.expect_error(response, 403)
        try:
            task = self.model.load(user, task_id)
        except Refused as e:
            return self.expect_error(response, e.status)
        assert response.status_code == 200, response.text
        assert response.json()["data"] == task.view()
        assert response.headers["ETag"] == f'"v{task.version}"'

    @rule(u=st.integers(0, 2), t=st.integers(0, 10**6))
    def history(self, u: int, t: int) -> None:
        user, task_id = self.pick_user(u), self.pick_task(self.pick_user(u), t)
        response = self.read(user, f"/api/tasks/{task_id}/history")
        task = self.model.tasks.get(task_id)
        if task is None or (task.owner != user and task.deleted):
            return self.expect_error(response, 404)
        if task.owner != user:
            return self.expect_error(response, 403)
        assert response.status_code == 200, response.text
        got = response.json()["data"]
        expected = [e for e in self.model.events[user] if e.task_id == task_id]
        assert [strip_time(g) for g in got] == [e.view() for e in expected]
        assert got[0]["occurred_at"] == task.created_at
        if not task.deleted:
            assert got[-1]["occurred_at"] == task.updated_at

    @rule(u=st.integers(0, 2), topic=st.one_of(st.none(), st.sampled_from(TOPICS)),
          t=st.one_of(st.none(), st.integers(0, 10**6)), since=st.one_of(st.none(), st.integers(0, 10**6)),
          until=st.one_of(st.none(), st.integers(0, 10**6)), limit=st.integers(1, 7))
    def feed(self, u: int, topic: str | None, t: int | None, since: int | None, until: int | None,
             limit: int) -> None:
        user = self.pick_user(u)
        events = list(self.model.events.get(user, []))
        params: dict[str, Any] = {"limit": limit}
        if topic is not None:
            params["type"] = topic
            events = [e for e in events if e.type == topic]
        if t is not None:
            params["task_id"] = task_id = self.pick_task(user, t)
            events = [e for e in events if e.task_id == task_id]
        # since/until: the creation time of one of the user's tasks (its TaskCreated event)
        created = [(i, e) for i, e in enumerate(self.model.events.get(user, [])) if e.type == "TaskCreated"]
        order = {id(e): i for i, e in enumerate(self.model.events.get(user, []))}
        for bound, name in ((since, "since"), (until, "until")):
            if bound is None or not created:
                continue
            index, event = created[bound % len(created)]
            params[name] = self.model.tasks[event.task_id].created_at
            if name == "since":
                events = [e for e in events if order[id(e)] >= index]
            else:
                events = [e for e in events if order[id(e)] < index]
        expected = [e.view() for e in reversed(events)]
        got: list[dict[str, Any]] = []
        pages = 0
        while True:
            response = self.read(user, "/api/history", params)
            assert response.status_code == 200, response.text
            body = response.json()
            assert len(body["data"]) <= limit
            got.extend(body["data"])
            pages += 1
            cursor = body["meta"]["next_cursor"]
            if cursor is None:
                break
            assert pages <= len(expected) + 1, "the feed does not end"
            params["cursor"] = cursor
        assert [strip_time(g) for g in got] == expected, (params, got, expected)

    @rule(u=st.integers(0, 2))
    def stats(self, u: int) -> None:
        user = self.pick_user(u)
        response = self.read(user, "/api/stats")
        live = self.model.live(user)
        done = sum(t.completed for t in live)
        assert response.status_code == 200, response.text
        assert response.json()["data"] == {"total": len(live), "completed": done, "pending": len(live) - done}

    @invariant()
    def keys_are_per_user(self) -> None:
        for (user, _), recorded in self.model.keys.items():
            if recorded.task is not None and "user_id" in recorded.task:
                assert recorded.task["user_id"] == user


def sort_tasks(tasks: list[MTask], sort: str) -> list[MTask]:
    desc = sort.startswith("-")
    name = sort.lstrip("-")
    if name == "title":
        # lower(title) in the given direction, then created_at DESC, task_id DESC
        by_new = sorted(tasks, key=lambda t: (at(t.created_at), uuid.UUID(t.id)), reverse=True)
        return sorted(by_new, key=lambda t: t.title.lower(), reverse=desc)
    return sorted(tasks, key=lambda t: (at(getattr(t, name)), uuid.UUID(t.id)), reverse=desc)


def at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def strip_time(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "occurred_at"}


# -- the test ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_db(pg_server: PostgresServer) -> Iterator[str]:
    url = fresh_database(pg_server)
    yield url
    pg_server.drop_database(url)


def test_users_see_only_their_own_data_whatever_they_do(own_db: str) -> None:
    from command_api.app import create_app as command_app
    from query_api.app import create_app as query_app

    settings_ = settings_for(own_db)
    with TestClient(command_app(settings_), raise_server_exceptions=False) as command, \
            TestClient(query_app(settings_), raise_server_exceptions=False) as query:
        Isolation.command, Isolation.query, Isolation.database_url = command, query, own_db
        FIGURES.clear()
        run_state_machine_as_test(
            Isolation,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                derandomize="ISOLATION_EXAMPLES" not in os.environ,  # a longer run explores afresh
                suppress_health_check=list(HealthCheck),
            ),
        )
    print(f"\nisolation: {dict(sorted(FIGURES.items()))}")
    assert FIGURES["examples"] >= EXAMPLES
    assert FIGURES["commands ok"] > 0 and FIGURES["reads ok"] > 0
