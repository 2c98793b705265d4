"""A local PostgreSQL for first runs and tests when no DATABASE_URL is given.

Uses the `pgserver` package (a bundled PostgreSQL, Python 3.11-3.12); elsewhere the
machine's `initdb`/`pg_ctl`. Data stays under the folder given (default `.data/`)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _machine_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


class EmbeddedPostgres:
    def __init__(self, datadir: Path) -> None:
        self.datadir = Path(datadir).resolve()
        self._server = None
        self._bin: Path | None = None
        self._started_here = False
        self._postmaster_pid: int | None = None

    def start(self) -> str:
        """Start (or join) the server and return its URL."""
        self.datadir.mkdir(parents=True, exist_ok=True)
        try:
            import pgserver  # noqa: PLC0415 - optional, Python <= 3.12 only
        except ImportError:
            return self._start_with_machine_binaries()
        pidfile = self.datadir / "postmaster.pid"
        self._started_here = not pidfile.exists()
        self._server = pgserver.get_server(self.datadir, cleanup_mode="stop")
        if self._started_here and pidfile.exists():
            self._postmaster_pid = int(pidfile.read_text().split()[0])
        return self._server.get_uri()

    def _start_with_machine_binaries(self) -> str:
        bindir = _machine_bin()
        if bindir is None:
            sys.exit(
                "No DATABASE_URL, no pgserver package and no initdb/pg_ctl on this machine: "
                "set DATABASE_URL to a PostgreSQL server."
            )
        if os.geteuid() == 0:
            sys.exit("PostgreSQL refuses to run as root: set DATABASE_URL instead.")
        self._bin = bindir
        pgdata = self.datadir / "pgdata"
        sockdir = Path(tempfile.mkdtemp(prefix="taskpg-"))
        if not (pgdata / "PG_VERSION").exists():
            subprocess.run(
                [bindir / "initdb", "-D", pgdata, "-U", "postgres", "-A", "trust"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        subprocess.run(
            [
                bindir / "pg_ctl", "-D", pgdata, "-w", "-l", self.datadir / "postgres.log",
                "-o", f"-k {sockdir} -c listen_addresses=''", "start",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.2)
        return f"postgresql://postgres@/postgres?host={sockdir}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            # pgserver leaves the server up when it counts another handle; a server this
            # process started is stopped here, by its own PID.
            if self._postmaster_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._postmaster_pid, signal.SIGINT)
                self._postmaster_pid = None
        if self._bin is not None:
            subprocess.run(
                [self._bin / "pg_ctl", "-D", self.datadir / "pgdata", "-m", "fast", "stop"],
                check=False,
                stdout=subprocess.DEVNULL,
            )
            self._bin = None
