"""The query API without the read-your-own-writes check, for the benchmark's
with/without comparison: `python -m bench.unchecked_reads --port N`.

Its reads are the query API's own (routes, statements, envelope) except that the
reader is not bound to the token's user: the statement does not join the user's latest
position and nothing waits for it. Everything else is the same, so the comparison
isolates the check's cost.
"""

from __future__ import annotations

import argparse
import os

from fastapi import FastAPI

from query_api.app import create_app as create_query_app
from query_api.reader import Reader
from shared.observability import configure_logging
from shared.settings import Settings


class UncheckedReader(Reader):
    def for_user(self, user_id: str) -> Reader:
        return self


def create_app() -> FastAPI:
    """The uvicorn factory: the query API with `UncheckedReader`, settings from the
    environment."""
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    app = create_query_app(settings)
    open_reader = app.state.open_reader

    async def open_unchecked() -> Reader:
        r = await open_reader()
        return UncheckedReader(r.pool, r.watch, r.wait_timeout, r.acquire_timeout,
                               codec=r.codec)

    app.state.open_reader = open_unchecked
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m bench.unchecked_reads")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The same call as taskctl.cli._serve, so both query APIs run the same server.
    uvicorn.run(
        "bench.unchecked_reads:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_level=os.environ.get("LOG_LEVEL", "info").lower(),
        log_config=None,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
