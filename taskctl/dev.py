"""The one-origin development app behind `taskctl dev`: the command API, the query
API and the projector in one process, on one port.

Reads (GET, HEAD) go to the query app and everything else to the command app, at the
same paths (but the live stream's paths, which are the query app's whatever the method:
its tickets are POSTs; deploy/nginx.conf routes them alike); one lifespan runs both apps'
lifespans and the projector as a background task. Imports `command_api`, `query_api`
and `projections` only inside `create_dev_app` and `run_dev` (this is a composition root).

`run_dev` is the whole `taskctl dev` life cycle: the port is bound before anything is
printed; the embedded PostgreSQL (when DATABASE_URL is unset) is started, its URL and
the dev secret recorded under the data folder (mode 0600) for the other `taskctl`
commands (`use_recorded_dev_service`); SIGINT, SIGTERM and SIGHUP stop the server and
then the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import signal
import socket
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from starlette.types import Receive, Scope, Send

from shared.settings import Settings

log = logging.getLogger("taskservice.dev")

READ_METHODS = frozenset({"GET", "HEAD"})
# The query app's paths for every method: the live stream and its tickets (POST).
QUERY_PATHS = re.compile(r"^/api/(?:[^/]+/)?tasks/stream(?:/tickets)?/?$")

Background = Callable[[asyncio.Event], Awaitable[None]]


class MethodDispatch:
    """An ASGI app: reads to `reads`, writes to `writes`, and one lifespan for both
    plus the `background` coroutines (each runs until its stop event is set)."""

    def __init__(self, reads: Any, writes: Any, background: tuple[Background, ...] = ()) -> None:
        self.reads = reads
        self.writes = writes
        self.background = background

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        reads = scope.get("method") in READ_METHODS or QUERY_PATHS.match(scope.get("path", ""))
        app = self.reads if reads else self.writes
        await app(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup
        stack = AsyncExitStack()
        try:
            for app in (self.writes, self.reads):
                await stack.enter_async_context(app.router.lifespan_context(app))
            for run in self.background:
                stack.push_async_callback(_stop, *_start(run))
        except BaseException as e:  # noqa: BLE001 - reported to the server, which exits
            log.exception("dev app failed to start")
            await stack.aclose()
            await send({"type": "lifespan.startup.failed", "message": repr(e)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await stack.aclose()
        except Exception as e:  # noqa: BLE001 - reported to the server
            await send({"type": "lifespan.shutdown.failed", "message": repr(e)})
            return
        await send({"type": "lifespan.shutdown.complete"})


def _start(run: Background) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run(stop), name=getattr(run, "__name__", "background"))

    def report(done: asyncio.Task[None]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.critical("background task %s stopped", done.get_name(), exc_info=done.exception())

    task.add_done_callback(report)
    return stop, task


async def _stop(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), 10)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    except Exception:  # noqa: BLE001, S110 - already logged by its done callback
        pass


def create_dev_app(settings: Settings) -> MethodDispatch:
    from command_api.app import create_app as create_command_app  # noqa: PLC0415
    from projections.projector import run as run_projector  # noqa: PLC0415
    from query_api.app import create_app as create_query_app  # noqa: PLC0415
    from shared.auth import Authenticator  # noqa: PLC0415

    dsn = settings.require_database_url()

    async def projector(stop: asyncio.Event) -> None:
        await run_projector(dsn, stop=stop)

    # One authenticator for both: one key set, one refresh, one verdict per token (two
    # kept their own caches, so a removed key could still verify for writes after reads
    # refused it), and its start-up advice said once.
    authenticator = Authenticator(settings)
    return MethodDispatch(
        reads=create_query_app(settings, authenticator=authenticator),
        writes=create_command_app(settings, authenticator=authenticator),
        background=(projector,),
    )


DEV_TOKEN_TTL_SECONDS = 24 * 3600
DATABASE_URL_FILE = "database-url"
SECRET_FILE = "dev-secret"
AUTH_SETTINGS = ("BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "JWKS_URL")


def data_dir() -> Path:
    return Path(os.environ.get("TASKCTL_DATA_DIR") or ".data")


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (0600) from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def dev_secret(datadir: Path) -> str:
    """A random HS256 secret kept under the data folder (never in the repository)."""
    path = datadir / SECRET_FILE
    if not path.exists():
        write_private(path, secrets.token_urlsafe(48))
    return path.read_text().strip()


def use_recorded_dev_service(datadir: Path | None = None) -> list[str]:
    """For every command but `dev`: take DATABASE_URL and BETTER_AUTH_SECRET from what
    `taskctl dev` recorded when they are unset (and no other auth setting is), saying so
    on stderr in one line. Returns the names taken."""
    datadir = data_dir() if datadir is None else datadir
    taken: list[str] = []
    url_file = datadir / DATABASE_URL_FILE
    if not os.environ.get("DATABASE_URL") and url_file.is_file():
        os.environ["DATABASE_URL"] = url_file.read_text().strip()
        taken.append("DATABASE_URL")
        # The dev service's database is a development one: it runs as `development`
        # (its master key is the development key db init made: docs/privacy.md).
        if not os.environ.get("ENVIRONMENT"):
            os.environ["ENVIRONMENT"] = "development"
            taken.append("ENVIRONMENT")
    secret_file = datadir / SECRET_FILE
    if not any(os.environ.get(name) for name in AUTH_SETTINGS) and secret_file.is_file():
        os.environ["BETTER_AUTH_SECRET"] = secret_file.read_text().strip()
        taken.append("BETTER_AUTH_SECRET")
    if taken:
        print(f"taskctl: using the dev service's {' and '.join(taken)} from {datadir}/"
              " (set them to use another service)", file=sys.stderr)
    return taken


class Stopped(BaseException):
    """A stop signal arrived (SIGINT, SIGTERM or SIGHUP): unwind and clean up."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def bind_port(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is printed; a busy port exits here."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            sys.exit(f"taskctl dev: port {port} on {host} is already in use; pick another"
                     f" with PORT=8080 make run (or taskctl dev --port 8080)")
        sys.exit(f"taskctl dev: cannot listen on {host}:{port}: {e.strerror}")
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _auth_url_problem(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3):
            return None
    except Exception as e:
        return str(getattr(e, "reason", None) or e)


def run_dev(host: str, port: int, datadir: Path) -> None:
    """`taskctl dev`: everything on one port for a first run."""
    import uvicorn

    from command_api.seed import DEMO_USERS, seed
    from shared import aio
    from shared.auth import mint_token
    from shared.observability import configure_logging
    from shared.serving import uvicorn_options
    from shared.settings import SettingsError
    from taskctl.dbinit import init_database
    from taskctl.embedded import EmbeddedPostgres, EmbeddedPostgresError

    previous = {sig: signal.signal(sig, _raise_stopped) for sig in STOP_SIGNALS}
    sock = bind_port(host, port)
    embedded = None
    url_file = datadir / DATABASE_URL_FILE
    try:
        overrides: dict[str, object] = {
            "environment": os.environ.get("ENVIRONMENT") or "development"}
        if not os.environ.get("DATABASE_URL"):
            embedded = EmbeddedPostgres(datadir / "postgres")
            try:
                overrides["database_url"] = embedded.start()
            except EmbeddedPostgresError as e:
                sys.exit(f"taskctl dev: {e}")
            write_private(url_file, str(overrides["database_url"]) + "\n")
        if not any(os.environ.get(name) for name in AUTH_SETTINGS):
            overrides["better_auth_secret"] = dev_secret(datadir)
        try:
            settings = Settings.from_env(**overrides)
        except SettingsError as e:
            sys.exit(f"taskctl: {e}")
        configure_logging(settings.log_level)  # JSON lines, as every other process
        init_database(settings)
        aio.run(lambda: seed(settings))
        base = f"http://{host}:{port}"
        lines = [f"\nTask service on {base}  (API docs: {base}/docs)"]
        if settings.better_auth_secret:
            lines.append(f"Demo users' tokens (valid {DEV_TOKEN_TTL_SECONDS // 3600} h;"
                         " `taskctl token --user ID` mints more):")
            for user in DEMO_USERS:
                token = mint_token(settings.better_auth_secret, user,
                                   ttl_seconds=DEV_TOKEN_TTL_SECONDS)
                lines.append(f"\n  demo user {user}:\n  export TOKEN={token}")
            lines.append(f'\n  curl -H "Authorization: Bearer $TOKEN" {base}/api/tasks\n')
        else:
            jwks = settings.effective_jwks_url or ""
            problem = _auth_url_problem(jwks) if jwks else None
            lines.append(f"No demo tokens: tokens come from {jwks} (BETTER_AUTH_URL/JWKS_URL"
                         " is set); unset it to get demo tokens.")
            if problem:
                lines.append(f"WARNING: {jwks} is not reachable ({problem}): every request"
                             " with a token will get 503 SERVICE_UNAVAILABLE (with"
                             " Retry-After) until it is.")
        print("\n".join(lines), flush=True)
        config = uvicorn.Config(
            create_dev_app(settings),
            log_level=settings.log_level.lower(),
            log_config=None,  # keep configure_logging's JSON lines (uvicorn's would replace them)
            timeout_graceful_shutdown=10,
            **uvicorn_options(settings),  # envelopes and slow-client deadlines
        )
        server = uvicorn.Server(config)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, server.handle_exit)  # uvicorn handles INT and TERM
        server.run(sockets=[sock])
    except Stopped:
        pass
    finally:
        for sig in STOP_SIGNALS:  # let the clean-up finish
            signal.signal(sig, signal.SIG_IGN)
        sock.close()
        if embedded is not None:
            embedded.stop()
            with contextlib.suppress(FileNotFoundError):
                url_file.unlink()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
