"""The query API with row-level security bypassed, for the benchmark's with/without
comparison (bench/row_security.py): `python -m bench.rls_bypassed --port N`, with
DATABASE_URL naming a role that has the query role's privileges and BYPASSRLS.

Its reads are the query API's own (routes, statements, envelope, the own-writes check)
except that the statement does not set its user (`Reader.sets_user` off: no `_who`
CTE, no LATERAL gate), and its role is not bound by the policies. So the comparison
with the query API as its own role isolates the whole cost of row-level security:
the setting, the statement's shape and the policies.
"""

from __future__ import annotations

from fastapi import FastAPI

from bench.procs import serve_variant
from query_api.app import create_app as create_query_app
from query_api.reader import Reader
from shared.settings import Settings


class BypassingReader(Reader):
    sets_user = False

    def for_user(self, user_id: str) -> Reader:
        return BypassingReader(self.pool, self.watch, self.wait_timeout, self.acquire_timeout,
                               user_id=user_id, own_positions=self.own_positions,
                               codec=self.codec)


def create_app() -> FastAPI:
    """The uvicorn factory: the query API with `BypassingReader`, settings from the
    environment."""
    app = create_query_app(Settings.from_env())
    open_reader = app.state.open_reader

    async def open_bypassing() -> Reader:
        r = await open_reader()
        return BypassingReader(r.pool, r.watch, r.wait_timeout, r.acquire_timeout,
                               own_positions=r.own_positions, codec=r.codec)

    app.state.open_reader = open_bypassing
    return app


def main() -> None:
    serve_variant("python -m bench.rls_bypassed", "bench.rls_bypassed:create_app")


if __name__ == "__main__":
    main()
