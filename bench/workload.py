"""What the simulated users do: the request mix, against our two APIs and, mapped
kind by kind, against the ceiling app.

Each user's seeded tasks are split: most are worked on (get, history, update,
complete), a reserve is only ever deleted, so no request races a delete of its own
task into a 404. Tasks created during the run join the delete reserve.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from uuid import UUID

from bench.http import Pool, Request, Response
from shared.auth import mint_token

QUERY_KINDS = ("list", "get", "history")
COMMAND_KINDS = ("create", "update", "complete", "delete")
KINDS = QUERY_KINDS + COMMAND_KINDS

DEFAULT_MIX = {
    "list": 10, "get": 30, "history": 10,
    "create": 15, "update": 15, "complete": 10, "delete": 10,
}

# Which ceiling endpoint each kind is compared with: each read with the bare SELECT
# of the same rows whose JSON PostgreSQL builds (bench/ceiling_app.py).
CEILING_OF = {
    "list": "list_json", "get": "get_json", "history": "history_json",
    "create": "insert", "update": "insert", "complete": "insert", "delete": "insert",
}
CEILINGS = ("insert", "get_json", "list_json", "history_json")

DELETE_RESERVE = 0.1  # of each user's seeded tasks


def parse_mix(text: str | None) -> dict[str, float]:
    if not text:
        return dict(DEFAULT_MIX)
    mix = {}
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind.strip() not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} (known: {', '.join(KINDS)})")
        mix[kind.strip()] = float(weight)
    return mix


@dataclass
class LagProbes:
    """Projection lag: from a command's response to the first read of the query API
    that reflects it (a GET of the task with `X-Min-Position`, re-asked until it
    answers non-stale with the task)."""

    pool: Pool
    deadline: float = 15.0
    lags: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def start(self, token: str, task_id: str, position: str, responded: float) -> None:
        task = asyncio.create_task(self._probe(token, task_id, position, responded))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _probe(self, token: str, task_id: str, position: str, responded: float) -> None:
        req = Request("lag", "GET", f"/api/tasks/{task_id}",
                      {"Authorization": token, "X-Min-Position": position})
        while time.perf_counter() - responded < self.deadline:
            conn = await self.pool.acquire()
            try:
                resp = await conn.send(req)
            except Exception as e:
                conn.close()
                self.errors.append(f"{type(e).__name__}: {e}")
                return
            finally:
                self.pool.release(conn)
            if resp.status == 200 and resp.json()["meta"].get("stale") is False:
                self.lags.append(time.perf_counter() - responded)
                return
            if resp.status not in (200, 404):
                self.errors.append(f"HTTP {resp.status}")
                return
            await asyncio.sleep(0.005)
        self.errors.append(f"not visible after {self.deadline}s")

    async def drain(self, timeout: float) -> None:
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=timeout)
            for task in late:
                task.cancel()


class Users:
    """The simulated users: their tokens and which of their tasks to use for what."""

    def __init__(self, secret: str, ids: dict[str, list[UUID]], ttl: int = 6 * 3600) -> None:
        self.users = list(ids)
        self.tokens = {u: "Bearer " + mint_token(secret, u, ttl_seconds=ttl) for u in self.users}
        self.work: dict[str, list[str]] = {}
        self.doomed: dict[str, deque[str]] = {}
        for user, tasks in ids.items():
            keep = len(tasks) - max(1, int(len(tasks) * DELETE_RESERVE))
            self.work[user] = [str(t) for t in tasks[:keep]]
            self.doomed[user] = deque(str(t) for t in tasks[keep:])
        self.tasks_per_user = max((len(t) for t in ids.values()), default=0)
        self._n = 0

    def pick(self, rng: random.Random) -> str:
        return rng.choice(self.users)

    def take_doomed(self, rng: random.Random) -> tuple[str, str] | None:
        start = rng.randrange(len(self.users))
        for i in range(len(self.users)):
            user = self.users[(start + i) % len(self.users)]
            if self.doomed[user]:
                return user, self.doomed[user].popleft()
        return None

    def title(self) -> str:
        self._n += 1
        return f"Benchmark title {self._n}"


class OurRequests:
    """Requests for our two APIs, one builder per kind."""

    def __init__(self, users: Users, command: Pool, query: Pool,
                 probes: LagProbes | None = None) -> None:
        self.u = users
        self.command = command
        self.query = query
        self.probes = probes

    def build(self, kind: str, rng: random.Random) -> tuple[Pool, Request] | None:
        u = self.u
        user = u.pick(rng)
        auth = {"Authorization": u.tokens[user]}
        if kind == "list":
            return self.query, Request(kind, "GET", "/api/tasks", auth)
        if kind == "get":
            return self.query, Request(kind, "GET", f"/api/tasks/{rng.choice(u.work[user])}", auth)
        if kind == "history":
            task = rng.choice(u.work[user])
            return self.query, Request(kind, "GET", f"/api/tasks/{task}/history", auth)
        if kind == "create":
            def created(resp: Response, now: float, user: str = user) -> None:
                data = resp.json()["data"]
                u.doomed[user].append(data["id"])
                if self.probes is not None:
                    self.probes.start(u.tokens[user], data["id"], resp.headers["x-position"], now)

            return self.command, Request(
                kind, "POST", "/api/tasks", auth,
                {"title": u.title(), "description": "Created under load"}, (201,), created,
            )
        if kind == "update":
            task = rng.choice(u.work[user])
            return self.command, Request(
                kind, "PATCH", f"/api/tasks/{task}", auth, {"title": u.title()}
            )
        if kind == "complete":
            task = rng.choice(u.work[user])
            return self.command, Request(
                kind, "PATCH", f"/api/{user}/tasks/{task}/complete", auth
            )
        if kind == "delete":
            taken = u.take_doomed(rng)
            if taken is None:
                return None
            user, task = taken
            return self.command, Request(
                kind, "DELETE", f"/api/tasks/{task}", {"Authorization": u.tokens[user]},
                expect=(204,),
            )
        raise ValueError(kind)


class CeilingRequests:
    """The same kinds, each sent to the ceiling endpoint it is compared with."""

    def __init__(self, users: Users, pool: Pool) -> None:
        self.u = users
        self.pool = pool

    def build(self, kind: str, rng: random.Random) -> tuple[Pool, Request]:
        return self.pool, self.endpoint(CEILING_OF[kind], rng, kind)

    def endpoint(self, name: str, rng: random.Random, kind: str | None = None) -> Request:
        user = self.u.pick(rng)
        kind = kind or name
        if name == "insert":
            return Request(kind, "POST", "/insert", {},
                           {"user_id": user, "title": self.u.title(), "description": "x"},
                           (201,))
        if name == "list_json":
            return Request(kind, "GET", f"/list/{user}")
        if name in ("get_json", "history_json"):
            task = rng.choice(self.u.work[user])  # the same tasks ours are asked for
            return Request(kind, "GET", f"/{name.removesuffix('_json')}/{user}/{task}")
        raise ValueError(name)


def mixer(mix: dict[str, float], build: Callable[[str, random.Random], tuple[Pool, Request] | None],
          fallback: str = "get") -> Callable[[random.Random], tuple[Pool, Request]]:
    kinds: Sequence[str] = [k for k, w in mix.items() if w > 0]
    weights = [mix[k] for k in kinds]

    def next_request(rng: random.Random) -> tuple[Pool, Request]:
        kind = rng.choices(kinds, weights)[0]
        built = build(kind, rng)
        if built is None:  # the delete reserve ran out
            built = build(fallback, rng)
            assert built is not None
        return built

    return next_request
