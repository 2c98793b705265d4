"""Running a coroutine to completion on the fastest event loop installed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run(coro_fn())`, on uvloop when it is installed (it is, with
    uvicorn[standard]), as uvicorn runs the APIs: its transports are C, and a process
    that spends its time in database round trips spends less CPU on each."""
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro_fn())
