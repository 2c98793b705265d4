"""A worker process of the replay's, driven from its event loop over a pipe.

The replay runs work that does not share Python's one core per process in children: the
verification fold (`projections.verify.FoldProcess`) and the second loader
(`projections.loader.LoadProcess`). Each is a `Child`: started by spawn (no fork of a
process with a running loop), it holds its state between calls, answers one call at a
time, in order, dies with its parent (SIGKILL on Linux, else at its next read of the
pipe) and ignores Ctrl-C (the parent stops it).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from projections.progress import peak_rss_mb

# A call's handler in the child: (state, *message) -> reply, run to its end.
Handler = Callable[..., Any]


class ChildFailed(RuntimeError):
    """The child failed (its database connection, say) or died."""


class Child:
    """A child process running `serve(make_state, handle, ...)`; `call` sends it a message
    and waits (on the event loop) for the reply. `what` names it in errors, which are
    `failed` (a `ChildFailed`)."""

    def __init__(
        self,
        handle: Handler,
        state: Callable[[], Any],
        args: tuple[Any, ...],
        *,
        name: str,
        what: str,
        failed: type[ChildFailed] = ChildFailed,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._process = ctx.Process(
            target=serve, args=(child, os.getpid(), state, handle, args), name=name, daemon=True
        )
        self.what = what
        self.failed = failed
        # Started with SIGINT ignored, which the child inherits across exec and Python
        # keeps: a Ctrl-C to the whole process group while the child is still starting
        # (before `serve` runs) must not kill it either.
        if threading.current_thread() is not threading.main_thread():  # no signals there
            self._process.start()
        else:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self._process.start()
            finally:
                signal.signal(signal.SIGINT, previous)
        child.close()
        self._lock = asyncio.Lock()

    async def call(self, *message: Any) -> Any:
        """The child's reply to `message`; raises `failed` if it failed or died."""
        async with self._lock:
            try:  # a child that died between calls closed its end: send fails then
                self._pipe.send(message)
                await self._readable()
                ok, value = self._pipe.recv()
            except (EOFError, OSError) as e:
                raise self.failed(
                    f"the {self.what} process died (exit code {self._process.exitcode})"
                ) from e
        if not ok:
            raise self.failed(f"the {self.what} failed: {value}")
        return value

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        fd = self._pipe.fileno()
        while not self._pipe.poll():
            ready = loop.create_future()
            loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(fd)

    def peak_rss_mb(self) -> float | None:
        """The child's peak resident memory so far (MB; `peak_rss_mb`), None if it is
        gone or there is no /proc."""
        return peak_rss_mb(self._process.pid) if self._process.is_alive() else None

    def close(self) -> None:
        """Stop the child now (what it holds dies with it: connections, a transaction)."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join(5)
        self._pipe.close()


def _die_with(parent: int) -> None:
    """SIGKILL this process when its parent dies. (Linux sends it when the parent's
    *thread* that started the child ends: a `Child` is started from the thread that
    runs the replay's event loop, which lives as long as the replay.)"""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the child still exits at its next read of the closed pipe
    if os.getppid() != parent:
        os._exit(1)


def serve(pipe: Any, parent: int, state: Callable[[], Any], handle: Handler,
          args: tuple[Any, ...]) -> None:
    """The child's loop: each message is run as `asyncio.run(handle(*args, state,
    *message))`, and its (ok, reply or error text) sent back."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.disable()  # the replay's reasoning: many objects, none in cycles
    held = state()
    while True:
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            return
        try:
            reply: Any = asyncio.run(handle(*args, held, *message))
        except Exception as e:  # handed to the parent, which raises it
            reply = (False, f"{type(e).__name__}: {e}")
        else:
            reply = (True, reply)
        try:
            pipe.send(reply)
        except OSError:
            return
