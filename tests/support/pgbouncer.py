"""A PgBouncer of our own in transaction mode, in front of a PostgreSQL server, on a free
127.0.0.1 port: Debian's `pgbouncer` binary (`.ci/run` installs it; a test that finds
it missing tries `apt-get install pgbouncer` once and skips, saying why, only if that
fails). It runs as the `postgres` user when the tests run as root (PgBouncer refuses
root), in the foreground as our child, and `stop` ends it by its PID.

Transaction mode: a server connection belongs to a client for one transaction only,
so session state (prepared statements, LISTEN, session advisory locks, SET) does not
survive from one transaction to the next; `DB_TRANSACTION_POOLER` makes the APIs work
that way (docs/scaling.md)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from shared.settings import postgres_params
from tests.support.process import free_port

INSTALL_TIMEOUT = 300
_install_tried: list[str] = []


def pgbouncer_binary() -> str:
    """The pgbouncer binary; installed with apt-get when missing (once per run);
    skips the test, saying why, when it cannot be had."""
    for path in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if path and os.access(path, os.X_OK):
            return path
    if not _install_tried:
        _install_tried.append(_install())
    for path in (shutil.which("pgbouncer"), "/usr/sbin/pgbouncer"):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip(f"pgbouncer is not installed and could not be installed ({_install_tried[0]});"
                " apt-get install pgbouncer (.ci/run does it)")


def _install() -> str:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root, or no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "pgbouncer"]):
            done = subprocess.run(args, env=env, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT)
            if done.returncode != 0:
                return f"{' '.join(args)}: {done.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        return f"apt-get did not finish in {INSTALL_TIMEOUT}s"
    return "installed"


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


class PgBouncer:
    """PgBouncer in transaction mode in front of `upstream_url`'s server (every database
    of it, user trusted as on the upstream), at most `pool_size` server connections per
    database and user."""

    def __init__(self, upstream_url: str, *, pool_size: int = 5, max_clients: int = 500) -> None:
        self.binary = pgbouncer_binary()
        self.folder = Path(tempfile.mkdtemp(prefix="taskservice-pgbouncer-"))
        self.port = free_port()
        self.log = self.folder / "pgbouncer.log"
        params = postgres_params(upstream_url)
        self.user = params["user"]
        host = params["host"]
        ini = self.folder / "pgbouncer.ini"
        (self.folder / "userlist.txt").write_text(f'"{self.user}" ""\n')
        ini.write_text(
            "[databases]\n"
            f"* = host={host} port={params['port']}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.folder / 'userlist.txt'}\n"
            f"admin_users = {self.user}\nstats_users = {self.user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            f"max_client_conn = {max_clients}\nmax_db_connections = {pool_size}\n"
            # The server's own timeouts come from the role (ALTER ROLE ... SET) in
            # production; a client that still sends them is refused by name.
            "ignore_startup_parameters = extra_float_digits\n"
            "server_reset_query =\nserver_check_delay = 0\n"
            f"logfile = {self.log}\npidfile =\nlog_connections = 0\nlog_disconnections = 0\n"
        )
        user = _server_user()
        if user is not None:
            for path in (self.folder, *self.folder.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._out = (self.folder / "stdout.log").open("wb")
        kwargs: dict[str, object] = {}
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.proc = subprocess.Popen([self.binary, str(ini)], stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     **kwargs)  # type: ignore[call-overload]
        try:
            self._wait_ready(upstream_url)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _wait_ready(self, upstream_url: str, timeout: float = 15) -> None:
        database = postgres_params(upstream_url)["dbname"]
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited {self.proc.returncode}:\n{self.output()}")
            try:
                # Simple query protocol only (prepare_threshold=None): as any client here.
                with psycopg.connect(self.url(database), connect_timeout=2,
                                     prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.Error as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer not ready in {timeout}s: {e}\n"
                                       f"{self.output()}") from e
                time.sleep(0.1)

    def show(self, what: str) -> list[dict[str, object]]:
        """`SHOW <what>` on PgBouncer's admin console (POOLS, SERVERS, STATS...)."""
        # The console speaks the simple query protocol only: a client-side cursor.
        with psycopg.connect(self.url("pgbouncer"), autocommit=True, connect_timeout=5,
                             cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.cursor()
            cur.execute(f"SHOW {what}")
            names = [c.name for c in cur.description or []]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def output(self) -> str:
        text = ""
        for path in (self.folder / "stdout.log", self.log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")[-3000:]
        return text

    def stop(self) -> None:
        """SIGINT (PgBouncer's safe shutdown) to its PID, SIGKILL if it lingers; the
        folder removed."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        finally:
            self._out.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
