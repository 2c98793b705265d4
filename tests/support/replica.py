"""A primary and a streaming replica of our own: two PostgreSQL clusters on free
127.0.0.1 ports, each in its own data folder under one temporary folder, made with the
machine's server binaries (`initdb`, `pg_basebackup -R` with a replication slot) and run
as the `postgres` operating-system user when the tests run as root (`runuser`).

Never the machine's shared server: these clusters are started, lagged, killed and
promoted on purpose. Everything is bounded in time (`pg_ctl -w -t`, subprocess
timeouts), and `close` stops what was started by its PIDs (`pg_ctl stop`, then SIGKILL
of the postmaster and of the children it had) and removes the folder.

`require_server_binaries` is the one reason to skip: a machine without the PostgreSQL
server binaries (Debian's postgresql-NN package) cannot run a cluster of its own.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest

from tests.support.process import free_port

START_TIMEOUT = 30  # seconds for pg_ctl start/stop/promote, each
REPLICA_NAME = "replica"  # its application_name on the primary, and its slot


def server_binaries() -> Path | None:
    """The folder of the newest machine PostgreSQL with initdb, pg_ctl and pg_basebackup."""
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_basebackup")]
    found = shutil.which("pg_basebackup")
    if found:
        candidates.append(Path(found).parent)
    usable = [d for d in candidates
              if all(os.access(d / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres"))]

    def version(d: Path) -> int:
        part = d.parent.name
        return int(part) if part.isdigit() else 0

    return max(usable, key=version) if usable else None


def require_server_binaries() -> Path:
    """The server binaries' folder; skips the test (saying why) when the machine has none."""
    bindir = server_binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup under"
                    " /usr/lib/postgresql/*/bin): a replica of our own cannot run here;"
                    " apt-get install postgresql")
    return bindir


def _run_as() -> list[str]:
    """The prefix that runs a server tool as the `postgres` user when we are root."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
    raise RuntimeError("running as root without a `postgres` or `nobody` user")


def _owner() -> tuple[int, int] | None:
    prefix = _run_as()
    if not prefix:
        return None
    user = pwd.getpwnam(prefix[2])
    return user.pw_uid, user.pw_gid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (an exited child not yet reaped) is not alive.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Cluster:
    """One PostgreSQL cluster: its data folder, port, log; started and stopped by PID."""

    def __init__(self, name: str, folder: Path, bindir: Path) -> None:
        self.name = name
        self.datadir = folder / name
        self.log = folder / f"{name}.log"
        self.bindir = bindir
        self.port = free_port()
        self.pid: int | None = None  # the postmaster's
        self._known_children: set[int] = set()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: object, timeout: float = START_TIMEOUT + 10,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        for name in ("PGDATA", "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGOPTIONS"):
            env.pop(name, None)
        result = subprocess.run(
            [*_run_as(), str(self.bindir / tool), *map(str, args)],
            capture_output=True, text=True, env=env, timeout=timeout,
            cwd=self.datadir.parent, start_new_session=True,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(map(str, args))} failed ({result.returncode}):"
                               f"\n{result.stdout}\n{result.stderr}\n{self.tail()}")
        return result

    def configure(self, **settings: object) -> None:
        """Append settings to postgresql.conf (the last one of a name wins)."""
        lines = []
        for key, value in settings.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'on' if value else 'off'}")
            elif isinstance(value, int):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f"{key} = '{value}'")
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(lines) + "\n")

    def start(self) -> None:
        self.run("pg_ctl", "-D", self.datadir, "-l", self.log, "-w", "-t", START_TIMEOUT,
                 "-o", f"-p {self.port}", "start")
        self.pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        self.wait_accepting()

    def wait_accepting(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.Error as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} does not accept connections: {e}"
                                       f"\n{self.tail()}") from e
                time.sleep(0.1)

    def running(self) -> bool:
        return self.pid is not None and _alive(self.pid)

    def reload(self) -> None:
        self.run("pg_ctl", "-D", self.datadir, "reload")

    def promote(self) -> float:
        """`pg_ctl promote` (waits until it accepts writes); the seconds it took."""
        started = time.monotonic()
        self.run("pg_ctl", "-D", self.datadir, "-w", "-t", START_TIMEOUT, "promote")
        return time.monotonic() - started

    def kill(self, *, children: bool = False) -> None:
        """SIGKILL of the postmaster (a crash). Its children notice and exit by
        themselves (any left are killed by PID on stop); `children`: SIGKILL them at
        the same moment too, as a lost machine sends nothing more (a stopped walsender
        included)."""
        assert self.pid is not None
        kids = _children(self.pid)
        self._known_children.update(kids)
        os.kill(self.pid, signal.SIGKILL)
        if children:
            for pid in kids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        """Fast shutdown by pg_ctl; whatever of ours is still alive then: SIGKILL by PID."""
        if self.pid is not None and _alive(self.pid):
            self._known_children.update(_children(self.pid))
            self.run("pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "-t", START_TIMEOUT,
                     "stop", check=False)
        for pid in ([self.pid] if self.pid else []) + sorted(self._known_children):
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in self._known_children | {self.pid or 0} if p):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.pid = None

    def execute(self, sql: str, params: Sequence[object] = (), database: str = "postgres"
                ) -> list[tuple]:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class ReplicaSet:
    """A primary and one streaming replica (a hot standby) of it, on its own slot.

    `synchronous`: the primary waits for the replica to flush each commit's WAL before
    it acknowledges the commit (synchronous_standby_names names the replica,
    synchronous_commit=on). `database`: created on the primary before the base backup."""

    def __init__(self, *, synchronous: bool = False, database: str = "tasks") -> None:
        self.bindir = require_server_binaries()
        self.folder = Path(tempfile.mkdtemp(prefix="taskservice-replica-"))
        self.database = database
        self.synchronous = synchronous
        owner = _owner()
        if owner is not None:
            os.chown(self.folder, *owner)
            # The server user must be able to reach the folder (o+x on /tmp and above).
            for parent in self.folder.resolve().parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        self.folder.chmod(0o700)
        self.primary = Cluster("primary", self.folder, self.bindir)
        self.replica = Cluster("replica", self.folder, self.bindir)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        p, r = self.primary, self.replica
        p.run("initdb", "-D", p.datadir, "-U", "postgres", "-A", "trust", "-E", "UTF8",
              "--no-instructions", "--no-sync")
        p.configure(
            listen_addresses="127.0.0.1", unix_socket_directories="", max_connections=80,
            shared_buffers="32MB", wal_level="replica", max_wal_senders=4,
            max_replication_slots=4, hot_standby=True, hot_standby_feedback=True,
            wal_receiver_status_interval="1s", log_min_messages="warning",
            log_line_prefix="%m [%p] ", synchronous_commit="on",
        )
        p.start()
        p.execute(f'CREATE DATABASE "{self.database}"')
        # -R writes standby.signal and primary_conninfo (with our application_name,
        # which synchronous_standby_names matches); -C -S: the slot keeps the WAL the
        # replica has not received yet.
        p.run("pg_basebackup", "-D", r.datadir, "-R", "-C", "-S", REPLICA_NAME,
              "-X", "stream", "-c", "fast", "--no-sync",
              "-d", f"host=127.0.0.1 port={p.port} user=postgres application_name={REPLICA_NAME}",
              timeout=120)
        auto = (r.datadir / "postgresql.auto.conf").read_text()
        assert f"application_name={REPLICA_NAME}" in auto and "primary_slot_name" in auto, auto
        r.start()
        if self.synchronous:
            # Only now: a primary waiting for a replica that does not exist yet would
            # hang every commit (CREATE DATABASE above included).
            self.set_synchronous(True)
        self.wait_streaming()

    # -- the replication --------------------------------------------------------------

    def replication(self) -> tuple[str, str] | None:
        """The replica's (state, sync_state) as the primary sees it, or None."""
        rows = self.primary.execute(
            "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s",
            (REPLICA_NAME,))
        return (rows[0][0], rows[0][1]) if rows else None

    def set_synchronous(self, on: bool) -> None:
        """Who must confirm each commit before the primary acknowledges it: the replica
        (synchronous replication), or nobody (asynchronous)."""
        self.synchronous = on
        names = REPLICA_NAME if on else ""
        self.primary.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        self.primary.reload()

    def wait_streaming(self, timeout: float = START_TIMEOUT) -> None:
        wanted = ("streaming", "sync" if self.synchronous else "async")
        deadline = time.monotonic() + timeout
        while (seen := self.replication()) != wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica not {wanted} after {timeout}s: {seen}\n"
                                   f"{self.replica.tail()}")
            time.sleep(0.05)

    def wait_replayed(self, timeout: float = 20) -> float:
        """Wait until the replica has replayed everything the primary has written now;
        the seconds it took."""
        started = time.monotonic()
        (lsn,), = self.primary.execute("SELECT pg_current_wal_lsn()::text")
        while True:
            (done,), = self.replica.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,))
            if done:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"replica has not replayed {lsn} in {timeout}s")
            time.sleep(0.01)

    def set_apply_delay(self, milliseconds: int) -> None:
        """recovery_min_apply_delay on the replica: it applies each commit that long after
        the primary made it (WAL still arrives at once; only replay waits)."""
        self.replica.execute(f"ALTER SYSTEM SET recovery_min_apply_delay = '{int(milliseconds)}ms'")
        self.replica.reload()
        deadline = time.monotonic() + 10
        while self.replica.execute("SHOW recovery_min_apply_delay")[0][0] != (
                f"{milliseconds}ms" if milliseconds else "0"):
            assert time.monotonic() < deadline, "recovery_min_apply_delay not applied"
            time.sleep(0.02)

    def primary_url(self) -> str:
        return self.primary.url(self.database)

    def replica_url(self) -> str:
        return self.replica.url(self.database)

    def close(self) -> None:
        try:
            for cluster in (self.replica, self.primary):
                with contextlib.suppress(Exception):
                    cluster.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@contextlib.contextmanager
def replica_set(**options: object) -> Iterator[ReplicaSet]:
    pair = ReplicaSet(**options)  # type: ignore[arg-type]
    try:
        yield pair
    finally:
        pair.close()
