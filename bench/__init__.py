"""The benchmark harness: how fast the service is, beside the ceiling of its stack.

Runs the real processes (`taskctl command-api`, `query-api`, `projector`) against a
dedicated PostgreSQL database, and a bare FastAPI + asyncpg app (`bench.ceiling_app`)
served the same way, in the same run; see bench/README.md. It imports the service's
packages only to seed data and to time a rebuild; it never changes them.

    python -m bench [--quick]      or      taskctl bench [--quick]
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from bench.run import main as run

    return run(None if argv is None else list(argv))
