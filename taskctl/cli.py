"""`taskctl`: the argument parser and one function per subcommand.

Each subcommand builds its settings once and imports only the part it runs (inside the
function), so a small command such as `taskctl token` starts without loading the APIs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from shared import aio
from shared.settings import Settings, SettingsError


def _settings(*, require_auth: bool = True, **overrides: object) -> Settings:
    try:
        return Settings.from_env(require_auth=require_auth, **overrides)
    except SettingsError as e:
        sys.exit(f"taskctl: {e}")


# -- argument types: each checks a value as the API checks the same parameter, so a bad
# filter is a usage error (status 2, naming what is accepted) rather than an empty answer.

def _event_type(text: str) -> str:
    from shared.events import EVENT_TOPICS  # only when --type is given: it loads the library

    if text not in EVENT_TOPICS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an event type; one of: {', '.join(sorted(EVENT_TOPICS))}")
    return text


def _task_id(text: str) -> str:
    from uuid import UUID

    try:
        return str(UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id (a UUID)") from None


def _instant(text: str) -> str:
    from datetime import UTC, datetime

    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date or date-time (e.g. 2026-12-01 or"
            " 2026-12-01T09:30:00+01:00)") from None
    try:  # an offset can carry it past year 1 or 9999, as the API refuses too
        (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is out of range (years 1 to 9999 in UTC)") from None
    return text


def _user(text: str) -> str:
    if not text.strip() or len(text) > 255 or not text.isprintable():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a user id (1-255 printable characters)")
    return text


def _number(kind: type, *, minimum: float, strict: bool = False, maximum: float | None = None):
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            noun = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
        if value != value or value < minimum or (strict and value == minimum) or (
                maximum is not None and value > maximum):
            bound = f"> {minimum}" if strict else f">= {minimum}"
            if maximum is not None:
                bound += f" and <= {maximum}"
            raise argparse.ArgumentTypeError(f"{text!r} is out of range (must be {bound})")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_POSITIVE_INT = _number(int, minimum=1)
_PORT = _number(int, minimum=0, maximum=65535)
_SECONDS = _number(float, minimum=0)
_POSITIVE_SECONDS = _number(float, minimum=0, strict=True)
_LOADERS = _number(int, minimum=1, maximum=16)


def _serve(app_path: str, host: str, port: int, settings: Settings) -> None:
    from shared.serving import serve

    serve(app_path, host, port, settings)


def cmd_db_init(_: argparse.Namespace) -> None:
    from taskctl.dbinit import InitRefused, init_database

    settings = _settings(require_auth=False)
    try:
        init_database(settings)
    except InitRefused as e:  # a restored store ahead of the cluster, a role unsafe...
        sys.exit(f"taskctl db init: refusing: {e}")
    print("database initialised")


def purge_idempotency(settings: Settings, older_than_hours: float | None = None) -> int | None:
    """Forget expired Idempotency-Keys with the command API's own purge (batched, under
    its lock); how many, or None when another process is purging right now."""
    from command_api.store import PostgresEventStore

    hours = settings.idempotency_ttl_hours if older_than_hours is None else older_than_hours

    async def purge() -> int | None:
        store = await PostgresEventStore.open(settings, sealing=False)
        try:
            return await store.purge_idempotency(hours)
        finally:
            await store.close()

    return aio.run(purge)


def cmd_db_purge_idempotency(args: argparse.Namespace) -> None:
    try:
        removed = purge_idempotency(_settings(require_auth=False), args.older_than_hours)
    except ValueError as e:
        sys.exit(f"taskctl db purge-idempotency: {e}")
    if removed is None:
        sys.exit("taskctl db purge-idempotency: another process is purging right now; try later")
    print(f"forgot {removed} idempotency keys")


def cmd_command_api(args: argparse.Namespace) -> None:
    _serve("command_api.app:create_app", args.host, args.port, _settings())


def cmd_query_api(args: argparse.Namespace) -> None:
    _serve("query_api.app:create_app", args.host, args.port, _settings())


def cmd_projector(args: argparse.Namespace) -> None:
    from projections.projector import main as follow

    settings = _settings(require_auth=False)
    from shared.observability import configure_logging

    configure_logging(settings.log_level)
    sys.exit(
        follow(
            settings.require_database_url(),
            batch_size=args.batch_size,
            poll_interval=args.poll_interval,
            metrics_host=args.metrics_host or settings.metrics_host,
            metrics_port=settings.metrics_port if args.metrics_port is None else args.metrics_port,
        )
    )


def cmd_seed(args: argparse.Namespace) -> None:
    from command_api.seed import seed

    created = aio.run(lambda: seed(_settings(), reset=args.reset))
    print(f"seeded {created} tasks" if created else "demo tasks already present")


def cmd_token(args: argparse.Namespace) -> None:
    from shared.auth import mint_token

    secret = os.environ.get("BETTER_AUTH_SECRET")
    if not secret:
        sys.exit("taskctl token: BETTER_AUTH_SECRET is not set; refusing to mint a token")
    print(
        mint_token(
            secret,
            args.user,
            ttl_seconds=args.ttl,
            issuer=os.environ.get("JWT_ISSUER") or None,
            audience=os.environ.get("JWT_AUDIENCE") or None,
        )
    )


def cmd_bench(args: argparse.Namespace) -> None:
    """The benchmark harness (`bench/`, a development tool run from a checkout)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "bench").is_dir() and str(root) not in sys.path:
        sys.path.insert(0, str(root))  # bench/ is not part of the installed package
    from bench import main as bench

    sys.exit(bench(args.bench_args))


def _database_url() -> str:
    """For the operator commands (replay, status, audit, export): they need the
    database, not the HTTP settings (no auth secret)."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("taskctl: DATABASE_URL is not set")
    return url


def cmd_replay(args: argparse.Namespace) -> None:
    from projections.admin import replay_main

    sys.exit(replay_main(_database_url(), args.projection, in_place=args.in_place,
                         as_json=args.json, batch_size=args.batch_size, lock_wait=args.wait,
                         loaders=args.loaders))


def cmd_projections_status(args: argparse.Namespace) -> None:
    from projections.admin import status_main

    sys.exit(status_main(_database_url(), as_json=args.json))


def cmd_audit(args: argparse.Namespace) -> None:
    from projections.audit import audit_main

    sys.exit(audit_main(_database_url(), args))


def cmd_export(args: argparse.Namespace) -> None:
    from projections.audit import export_main

    sys.exit(export_main(_database_url(), args.user))


def cmd_users_forget(args: argparse.Namespace) -> None:
    from projections.erasure import forget_main

    sys.exit(forget_main(_database_url(), args.user, as_json=args.json,
                         vacuum=not args.no_vacuum))


def cmd_users_rotate_key(args: argparse.Namespace) -> None:
    from taskctl.keys import rotate_user_key_main

    sys.exit(rotate_user_key_main(_database_url(), args.user))


def cmd_keys_rotate_master(_: argparse.Namespace) -> None:
    from taskctl.keys import rotate_master_main

    sys.exit(rotate_master_main(_database_url()))


def cmd_dev(args: argparse.Namespace) -> None:
    """Everything on one port for a first run: embedded PostgreSQL when DATABASE_URL is
    unset, tables, demo data, and a token for each demo user."""
    from taskctl.dev import run_dev

    run_dev(args.host, args.port, Path(args.data_dir))


def cmd_auth_check(args: argparse.Namespace) -> None:
    from taskctl.authcheck import main as auth_check

    sys.exit(auth_check(_settings(), args.token))


def cmd_openapi(args: argparse.Namespace) -> None:
    from taskctl.openapi import main as openapi

    sys.exit(openapi(write=args.write, check=args.check))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskctl", description="Run and operate the task service.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database set-up")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("init", help="create the event store and read tables (idempotent)").set_defaults(
        func=cmd_db_init
    )
    purge = db_sub.add_parser(
        "purge-idempotency",
        help="forget Idempotency-Keys older than IDEMPOTENCY_TTL_HOURS (default 24; run daily)",
    )
    purge.add_argument("--older-than-hours", type=_SECONDS, default=None)
    purge.set_defaults(func=cmd_db_purge_idempotency)

    api = sub.add_parser("command-api", help="serve the command API with uvicorn")
    api.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    api.add_argument("--port", type=_PORT, default=int(os.environ.get("PORT", "8001")))
    api.set_defaults(func=cmd_command_api)

    query = sub.add_parser("query-api", help="serve the query API with uvicorn")
    query.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    query.add_argument("--port", type=_PORT, default=int(os.environ.get("PORT", "8002")))
    query.set_defaults(func=cmd_query_api)

    projector = sub.add_parser("projector", help="follow the event store into the read tables")
    projector.add_argument("--batch-size", type=_POSITIVE_INT, default=500, help="events per transaction")
    projector.add_argument(
        "--poll-interval", type=_POSITIVE_SECONDS, default=1.0, help="seconds between polls without NOTIFY"
    )
    projector.add_argument("--metrics-host", default=None,
                           help="address of /metrics and /health (default METRICS_HOST, 127.0.0.1)")
    projector.add_argument("--metrics-port", type=_PORT, default=None,
                           help="port of /metrics and /health (default METRICS_PORT, 9100; 0: off)")
    projector.set_defaults(func=cmd_projector)

    replay = sub.add_parser(
        "replay",
        help="rebuild read tables from the first event beside the live ones, verify, switch",
    )
    replay.add_argument("--projection", action="append", metavar="NAME",
                        help="a projection to rebuild (repeatable; default all: task_views)")
    replay.add_argument("--in-place", action="store_true",
                        help="development only: truncate and rebuild the live tables directly")
    replay.add_argument("--batch-size", type=_POSITIVE_INT, default=10_000, help="events per transaction")
    replay.add_argument("--wait", type=_SECONDS, default=10.0, metavar="SECONDS",
                        help="how long to wait for another replay of the projection (one"
                             " killed a moment ago, say) before giving up (default 10)")
    replay.add_argument("--loaders", type=_LOADERS, default=None, metavar="N",
                        help="processes that load the events, each with its own share of"
                             " the tasks and 3 database connections (default: one per core,"
                             " at most 2, from 100,000 events; 1 leaves the other cores to"
                             " the services; not with --in-place)")
    replay.add_argument("--json", action="store_true", help="print the summary as JSON")
    replay.set_defaults(func=cmd_replay)

    projections = sub.add_parser("projections", help="inspect the projections")
    projections_sub = projections.add_subparsers(dest="projections_command", required=True)
    status = projections_sub.add_parser(
        "status", help="position, head, lag, projector lock and served table version")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_projections_status)

    audit = sub.add_parser(
        "audit", help="read the event store itself (not the read tables), oldest first",
        description="Stream events from the event store in its global order. Filters combine."
        " --user matches events of tasks the user owns OR events the user performed (actor).")
    audit.add_argument("--user", type=_user, help="task owner OR actor of the event")
    audit.add_argument("--task", type=_task_id, help="task id (UUID)")
    audit.add_argument("--since", type=_instant, help="ISO 8601, inclusive (no offset means UTC)")
    audit.add_argument("--until", type=_instant, help="ISO 8601, exclusive")
    audit.add_argument("--type", action="append", type=_event_type, dest="types", metavar="TYPE",
                       help="event type, e.g. TaskCompleted (repeatable)")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.add_argument("--verify", action="store_true",
                       help="check versions, actors and the history read table; exit 1 on a"
                            " difference")
    audit.add_argument("--expect-digest", metavar="POSITION:SHA256",
                       help="with --verify (implied): a digest an earlier --verify printed;"
                            " exit 1 if the events up to its position no longer hash to it")
    audit.set_defaults(func=cmd_audit)

    auth = sub.add_parser("auth", help="the APIs' token check")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True)
    auth_check = auth_sub.add_parser(
        "check", help="print the auth settings and the key server's state; with --token, each"
                      " verification step (exit 1 when the APIs would refuse it)")
    auth_check.add_argument("--token", metavar="T",
                            help="a token (or 'Bearer T'; '-' reads it from stdin)")
    auth_check.set_defaults(func=cmd_auth_check)

    openapi = sub.add_parser(
        "openapi", help="print the one OpenAPI document of both APIs (shared/openapi.json)")
    openapi_mode = openapi.add_mutually_exclusive_group()
    openapi_mode.add_argument("--write", action="store_true",
                              help="store it in shared/openapi.json (after changing a route)")
    openapi_mode.add_argument("--check", action="store_true",
                              help="exit 1 when shared/openapi.json is out of date")
    openapi.set_defaults(func=cmd_openapi)

    export = sub.add_parser("export", help="every event of one user's tasks, as JSON lines")
    export.add_argument("--user", required=True, type=_user, help="the owner whose tasks to export")
    export.set_defaults(func=cmd_export)

    users = sub.add_parser("users", help="a user's data: export, erase, a new data key")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    users_export = users_sub.add_parser(
        "export", help="every event of the user's tasks, opened, as JSON lines (the right of"
                       " access; the same as `taskctl export --user`)")
    users_export.add_argument("user", type=_user)
    users_export.set_defaults(func=cmd_export)
    forget = users_sub.add_parser(
        "forget", help="erase a user: delete their data keys and, in the same transaction,"
                       " their read rows, history and Idempotency-Keys; events stay, unreadable",
        description="Crypto-shredding (docs/privacy.md). Exit status: 0 erased, 3 a replay is"
                    " running (nothing changed), 4 the user has tasks stored before sealing"
                    " (nothing changed).")
    forget.add_argument("user", type=_user)
    forget.add_argument("--json", action="store_true", help="print the report as JSON")
    forget.add_argument("--no-vacuum", action="store_true",
                        help="skip the VACUUM of the tables rows were deleted from (dead row"
                             " versions keep a copy until the next vacuum)")
    forget.set_defaults(func=cmd_users_forget)
    rotate_key = users_sub.add_parser(
        "rotate-key", help="a new data key for the user: their next events are sealed with it")
    rotate_key.add_argument("user", type=_user)
    rotate_key.set_defaults(func=cmd_users_rotate_key)

    keys = sub.add_parser("keys", help="the master key that wraps the users' data keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser(
        "rotate-master", help="wrap every data key again with DATA_MASTER_KEY's first key"
                              " (set DATA_MASTER_KEY=NEW,OLD first; docs/privacy.md)",
    ).set_defaults(func=cmd_keys_rotate_master)

    seed = sub.add_parser("seed", help="create the two demo users' tasks through commands")
    seed.add_argument("--reset", action="store_true", help="delete the demo users' tasks first")
    seed.set_defaults(func=cmd_seed)

    dev = sub.add_parser("dev", help="run everything on one port for local development")
    dev.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    dev.add_argument("--port", type=_PORT, default=int(os.environ.get("PORT", "8000")))
    dev.add_argument("--data-dir", default=os.environ.get("TASKCTL_DATA_DIR", ".data"))
    dev.set_defaults(func=cmd_dev)

    token = sub.add_parser("token", help="mint a development HS256 token")
    token.add_argument("--user", required=True, type=_user)
    token.add_argument("--ttl", type=_POSITIVE_INT, default=24 * 3600, help="seconds (default one day)")
    token.set_defaults(func=cmd_token)

    # Every argument goes to `python -m bench` untouched: no option prefix for argparse.
    bench = sub.add_parser("bench", help="benchmark the real processes (python -m bench --help)",
                           add_help=False, prefix_chars="\0")
    bench.add_argument("bench_args", nargs="*")
    bench.set_defaults(func=cmd_bench)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taskservice")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.func is not cmd_dev:
        from taskctl.dev import use_recorded_dev_service

        use_recorded_dev_service()
    try:
        try:
            args.func(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the try
    except BrokenPipeError:
        # The reader went away (`taskctl audit | head -1`): stop quietly, like cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
