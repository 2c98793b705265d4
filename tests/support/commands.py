"""The command executor for synchronous tests: an event loop in a thread of its own,
with a `PostgresEventStore` on it. Each call blocks until the command is decided and
saved; calls from many threads at once run concurrently on that loop, as concurrent
requests do in the API."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar
from uuid import UUID

from command_api.commands import Command, Stamp
from command_api.executor import Executor, IdempotencyKey, Outcome
from command_api.store import PostgresEventStore
from shared.etag import IfMatch
from shared.events import Task
from shared.settings import Settings

T = TypeVar("T")


class LoopThread:
    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="command-loop")
        self._thread.start()
        try:
            self.store: PostgresEventStore = self.run(PostgresEventStore.open(settings))
        except BaseException:
            self._stop()
            raise

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def executor(self, **options: Any) -> BlockingExecutor:
        """An executor of its own (its own cache and locks: like another process)."""
        return BlockingExecutor(self, Executor(self.store, **options))

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


class BlockingExecutor:
    def __init__(self, loop: LoopThread, executor: Executor) -> None:
        self._loop = loop
        self.executor = executor

    def run(
        self,
        command: Command,
        stamp: Stamp,
        *,
        expected: IfMatch | None = None,
        key: IdempotencyKey | None = None,
    ) -> Outcome:
        return self._loop.run(self.executor.run(command, stamp, expected=expected, key=key))
