"""The command handlers for synchronous callers (`taskctl seed`, scripts, tests).

The same `TaskCommands` the API runs, on an event loop in a thread of this object's own:
each call blocks until its command is decided and saved. Calls from many threads at once
run concurrently on that loop, as concurrent requests do in the API.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from uuid import UUID

from command_api.commands import ChangeTask, CreateTask
from command_api.handlers import Actor, Outcome, TaskCommands
from command_api.store import AsyncTaskStore
from shared.etag import IfMatch
from shared.events import Task
from shared.settings import Settings

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread, with an event store client on it."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="command-loop")
        self._thread.start()
        try:
            self.store: AsyncTaskStore = self.run(AsyncTaskStore.open(settings))
        except BaseException:
            self._stop()
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def handlers(self, **options: Any) -> BlockingCommands:
        """A handler instance of its own (its own cache and locks: like another process)."""
        return BlockingCommands(self, TaskCommands(self.store, **options))

    def get(self, task_id: UUID, version: int | None = None) -> Task | None:
        return self.run(self.store.get(task_id, version))

    def close(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self._stop()

    def _stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> LoopThread:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class BlockingCommands:
    def __init__(self, loop: LoopThread, commands: TaskCommands) -> None:
        self._loop = loop
        self.commands = commands

    def create(self, actor: Actor, command: CreateTask) -> Outcome:
        return self._loop.run(self.commands.create(actor, command))

    def change(
        self, actor: Actor, task_id: UUID, command: ChangeTask, expected: IfMatch | None
    ) -> Outcome:
        return self._loop.run(self.commands.change(actor, task_id, command, expected))

    def toggle(
        self, actor: Actor, task_id: UUID, completed: bool | None, expected: IfMatch | None
    ) -> Outcome:
        return self._loop.run(self.commands.toggle(actor, task_id, completed, expected))

    def delete(self, actor: Actor, task_id: UUID, expected: IfMatch | None) -> Outcome:
        return self._loop.run(self.commands.delete(actor, task_id, expected))
