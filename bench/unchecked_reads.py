"""The query API without the read-your-own-writes check, for the benchmark's
with/without comparison: `python -m bench.unchecked_reads --port N`.

Its reads are the query API's own (routes, statements, envelope) except that the
reader is not bound to the token's user: the statement does not join the user's latest
position and nothing waits for it. Everything else is the same, so the comparison
isolates the check's cost.
"""

from __future__ import annotations

from fastapi import FastAPI

from bench.procs import serve_variant
from query_api.app import create_app as create_query_app
from query_api.reader import Reader
from shared.settings import Settings


class UncheckedReader(Reader):
    def for_user(self, user_id: str) -> Reader:
        return self


def create_app() -> FastAPI:
    """The uvicorn factory: the query API with `UncheckedReader`, settings from the
    environment."""
    settings = Settings.from_env()
    app = create_query_app(settings)
    open_reader = app.state.open_reader

    async def open_unchecked() -> Reader:
        r = await open_reader()
        return UncheckedReader(r.pool, r.watch, r.wait_timeout, r.acquire_timeout,
                               codec=r.codec)

    app.state.open_reader = open_unchecked
    return app


def main() -> None:
    serve_variant("python -m bench.unchecked_reads", "bench.unchecked_reads:create_app")


if __name__ == "__main__":
    main()
