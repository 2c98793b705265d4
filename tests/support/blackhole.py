"""A TCP proxy on 127.0.0.1 in front of PostgreSQL that can be frozen: a hung database
as its clients see it (SIGSTOPped, or a network black hole).

Frozen, it forwards no byte in either direction and keeps every socket open: clients
see no error, no reset, no close, only silence; a new connection is accepted and then
hears nothing either. Thawed, whatever was held back is forwarded (as TCP would once a
black hole heals), so a statement a client gave up on may still reach the server and
commit. It runs its own event loop in a daemon thread and closes every socket on `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from shared.settings import postgres_params
from tests.support import database_name

CHUNK = 65_536


class FreezableProxy:
    def __init__(self, upstream_url: str) -> None:
        params = postgres_params(upstream_url)
        self._host, self._port = params["host"], int(params["port"])
        self._user, self._dbname = params["user"], database_name(upstream_url) or params["dbname"]
        self._password = params["password"]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy",
                                        daemon=True)
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.connections = 0  # accepted since start

    # -- control (from the test's thread) ----------------------------------------------

    def start(self) -> FreezableProxy:
        self._thread.start()
        self._call(self._start())
        return self

    @property
    def url(self) -> str:
        """The database URL through the proxy."""
        auth = self._user + (f":{self._password}" if self._password else "")
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{self._dbname}"

    def freeze(self) -> None:
        self._loop.call_soon_threadsafe(self._require_event().clear)

    def thaw(self) -> None:
        self._loop.call_soon_threadsafe(self._require_event().set)

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._stop(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running():
            self._loop.close()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    # -- the proxy (on its own loop) ---------------------------------------------------

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _require_event(self) -> asyncio.Event:
        assert self._flowing is not None, "start() the proxy first"
        return self._flowing

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None and self._flowing is not None
        self._server.close()
        self._flowing.set()
        for writer in list(self._writers):
            writer.close()
        for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            task.cancel()
        await asyncio.sleep(0)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_w)
        try:
            if self._host.startswith("/"):  # a unix-socket server (the embedded one)
                upstream = f"{self._host}/.s.PGSQL.{self._port}"
                server_r, server_w = await asyncio.open_unix_connection(upstream)
            else:
                server_r, server_w = await asyncio.open_connection(self._host, self._port)
        except OSError:
            client_w.close()
            self._writers.discard(client_w)
            return
        self._writers.add(server_w)
        try:
            await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w))
        finally:
            for w in (client_w, server_w):
                w.close()
                self._writers.discard(w)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        flowing = self._require_event()
        try:
            while True:
                await flowing.wait()
                data = await source.read(CHUNK)
                await flowing.wait()  # read just before a freeze: held back too
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if sink.can_write_eof():
                    sink.write_eof()
