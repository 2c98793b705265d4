"""A Server-Sent Events client for the tests: reads one stream (HTTP/1.1 on a socket of
its own, so `close` is a real disconnect) in a thread and parses it as EventSource does
(fields `id`, `event`, `data`, `retry`; comments counted), so a test can wait for the
next event with a timeout."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

CLOSED = "closed"  # the `event` of the pseudo-event put when the stream ends


@dataclass
class Event:
    event: str
    data: str
    id: str | None
    at: float  # time.monotonic() when it was read

    def json(self) -> Any:
        return json.loads(self.data)


class SseClient:
    def __init__(self, url: str, *, headers: dict[str, str] | None = None,
                 params: dict[str, str] | None = None, read_timeout: float = 60) -> None:
        self.url = url
        self.headers = headers or {}
        self.params = params or {}
        self.read_timeout = read_timeout
        self.events: queue.Queue[Event] = queue.Queue()
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self.body = b""
        self.retry: int | None = None
        self.comments = 0
        self.last_id: str | None = None
        self._opened = threading.Event()
        self._sock: socket.socket | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="sse-client")

    def __enter__(self) -> SseClient:
        if not self._thread.is_alive() and not self._opened.is_set():
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, timeout: float = 10) -> SseClient:
        self._thread.start()
        assert self._opened.wait(timeout), f"no answer from {self.url} in {timeout}s"
        return self

    def _run(self) -> None:
        try:
            parts = urlsplit(self.url)
            query = urlencode(self.params)
            target = (parts.path or "/") + (f"?{query}" if query else "")
            sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=10)
            self._sock = sock
            head = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}",
                    "Accept: text/event-stream"]
            head += [f"{k}: {v}" for k, v in self.headers.items()]
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            sock.settimeout(self.read_timeout)
            stream = sock.makefile("rb")
            self.status = int(stream.readline().split()[1])
            headers: dict[str, str] = {}
            while (line := stream.readline().rstrip(b"\r\n")):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            self.response_headers = headers
            if self.status != 200:
                self.body = stream.read(int(headers.get("content-length", "0")))
                self._opened.set()
                return
            self._opened.set()
            assert headers.get("transfer-encoding") == "chunked", headers
            self._parse(stream)
        except Exception:  # noqa: BLE001 - closed under it, or the server went away
            pass
        finally:
            self._opened.set()
            self.events.put(Event(CLOSED, "", None, time.monotonic()))

    def _chunks(self, stream: Any) -> Any:
        while not self._stopping:
            size = int(stream.readline().strip(), 16)
            if size == 0:
                return
            chunk = stream.read(size)
            stream.readline()  # the chunk's CRLF
            yield chunk

    def _parse(self, stream: Any) -> None:
        kind, data, event_id = "", [], None
        pending = b""
        for chunk in self._chunks(stream):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode()
                if line == "":
                    if event_id is not None:
                        self.last_id = event_id
                    if data:
                        self.events.put(Event(kind or "message", "\n".join(data), event_id,
                                              time.monotonic()))
                    kind, data, event_id = "", [], None
                    continue
                if line.startswith(":"):
                    self.comments += 1
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    kind = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    event_id = value
                elif name == "retry" and value.isdigit():
                    self.retry = int(value)

    def next(self, timeout: float = 5) -> Event:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event within {timeout}s") from None

    def next_of(self, *kinds: str, timeout: float = 5) -> Event:
        """The next event of one of `kinds`, skipping others (`ready`)."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(0.01, deadline - time.monotonic()))
            if event.event in kinds or event.event == CLOSED:
                return event

    def take(self, n: int, timeout: float = 10, kinds: tuple[str, ...] = (
            "task", "task_deleted")) -> list[Event]:
        """The next `n` changes (skipping `ready`), failing on the stream's end."""
        deadline = time.monotonic() + timeout
        got: list[Event] = []
        while len(got) < n:
            event = self.next(max(0.01, deadline - time.monotonic()))
            if event.event == CLOSED or event.event == "end":
                raise AssertionError(f"the stream ended after {got}: {event}")
            if event.event in kinds:
                got.append(event)
        return got

    def quiet(self, seconds: float, kinds: tuple[str, ...] = ("task", "task_deleted")) -> list[
            Event]:
        """Every change that arrives within `seconds` (expected: none)."""
        deadline = time.monotonic() + seconds
        got = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=left)
            except queue.Empty:
                break
            if event.event in kinds:
                got.append(event)
        return got

    def close(self) -> None:
        """Disconnect (the server sees the client go) and wait for the reader."""
        self._stopping = True
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(10)
