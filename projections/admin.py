"""`taskctl replay` and `taskctl projections status`: what they print and their exit status."""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict
from typing import Any

import asyncpg

from projections import checkpoints as cp
from projections import lease as leases
from projections.manifest import PROJECTIONS, table_names
from projections.progress import ProgressReport
from projections.replay import ReplayBusy, VerificationFailed, replay
from shared.catalog import EVENTS_TABLE, VERSIONS_TABLE, projector_lock
from shared.errors import DATABASE_DOWN


def replay_main(
    dsn: str,
    projections: list[str] | None,
    *,
    in_place: bool,
    as_json: bool,
    batch_size: int,
    lock_wait: float = 10.0,
    loaders: int | None = None,
) -> int:
    names = projections or list(PROJECTIONS)
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown:
        print(f"taskctl replay: unknown projection(s) {', '.join(unknown)};"
              f" known: {', '.join(PROJECTIONS)}", file=sys.stderr)
        return 2
    results = []
    for name in names:
        report = ProgressReport(f"replay {name}")
        try:
            result = asyncio.run(replay(dsn, projection=name, in_place=in_place,
                                        batch_size=batch_size, on_progress=report,
                                        lock_wait=lock_wait, loaders=loaders))
        except VerificationFailed as e:
            report.finish()
            print(f"taskctl replay: verification failed for {name}; the live tables are"
                  " unchanged (the rebuilt ones are dropped by the next run)", file=sys.stderr)
            for user, diffs in e.differing.items():
                print(f"  user {user}: {'; '.join(diffs)}", file=sys.stderr)
            for problem in e.problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        except ReplayBusy as e:
            report.finish()
            print(f"taskctl replay: {e}", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            report.finish()
            print(f"taskctl replay: interrupted; {_left_as_it_was(in_place)}", file=sys.stderr)
            return 130
        except DATABASE_DOWN as e:
            report.finish()
            print(f"taskctl replay: lost the database ({type(e).__name__}: {e});"
                  f" {_left_as_it_was(in_place)}", file=sys.stderr)
            return 4
        report.finish()
        results.append(result)
    for result in results:
        if as_json:
            print(json.dumps(asdict(result)))
        else:
            rows = ", ".join(f"{table} {count:,}" for table, count in result.rows.items())
            what = "rebuilt in place" if result.in_place else f"switched to version {result.version}"
            print(f"{result.projection}: {what}: {result.events:,} events in"
                  f" {result.seconds:.1f}s ({result.events_per_s:,.0f} events/s); rows: {rows}")
    return 0


def _left_as_it_was(in_place: bool) -> str:
    if in_place:
        return "the live tables were being rebuilt in place: run it again"
    return "the live tables are unchanged; run it again (it starts clean)"


async def projection_status(dsn: str) -> list[dict[str, Any]]:
    """Each projection's checkpoint, the head, the lag, who holds it (the advisory lock's
    backend, and the lease: holder, epoch, expiry), the served version."""
    conn = await asyncpg.connect(dsn)
    try:
        head = await cp.head(conn)
        out = []
        for name, tables in PROJECTIONS.items():
            position = await cp.read_checkpoint(conn, tables, name)
            events, seconds = await cp.lag(conn, position) if position is not None else (
                await conn.fetchval(f"SELECT count(*) FROM {EVENTS_TABLE}"), None)
            holder = await _lock_holder(conn, name)
            version = None
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", VERSIONS_TABLE):
                version = await conn.fetchval(
                    f"SELECT version FROM {VERSIONS_TABLE} WHERE projection = $1", name)
            out.append({
                "projection": name,
                "position": None if position is None else str(position),
                "head": str(head),
                "lag_events": int(events),
                "lag_seconds": None if seconds is None else round(seconds, 3),
                "held_by_projector": holder is not None,
                "projector_pid": None if holder is None else holder["pid"],
                "lease": await leases.status(conn, name),
                "serving_version": version if version is not None else 0,
                "tables": table_names(tables),
            })
        return out
    finally:
        await conn.close()


async def _lock_holder(conn: asyncpg.Connection, projection: str) -> asyncpg.Record | None:
    """The backend holding the live projector's session advisory lock, if any. A bigint
    advisory key shows in pg_locks as classid (high 32 bits) and objid (low 32 bits)."""
    return await conn.fetchrow(
        "WITH k AS (SELECT hashtextextended($1, 0) AS key)"
        " SELECT l.pid FROM pg_locks l, k WHERE l.locktype = 'advisory' AND l.granted"
        " AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database"
        "   WHERE datname = current_database())"
        " AND l.classid::bigint = ((k.key >> 32) & 4294967295)"
        " AND l.objid::bigint = (k.key & 4294967295) LIMIT 1",
        projector_lock(projection),
    )


def status_main(dsn: str, *, as_json: bool) -> int:
    rows = asyncio.run(projection_status(dsn))
    if as_json:
        print(json.dumps({"projections": rows}))
        return 0
    for r in rows:
        held = f"yes (pid {r['projector_pid']})" if r["held_by_projector"] else "no"
        lease = r["lease"]
        if lease is None:
            leased = "none"
        else:
            seconds = lease["expires_in_seconds"]
            when = (f"lapsed {-seconds:.1f}s ago" if lease["lapsed"]
                    else f"expires in {seconds:.1f}s")
            pids = ", ".join(map(str, lease["backends"]))
            leased = f"epoch {lease['epoch']}, {lease['holder']} (backends {pids}), {when}"
        lag_s = "-" if r["lag_seconds"] is None else f"{r['lag_seconds']:.1f}s"
        print(f"projection   {r['projection']}\n"
              f"position     {r['position']}\n"
              f"head         {r['head']}\n"
              f"lag          {r['lag_events']:,} events, {lag_s}\n"
              f"projector    {held}\n"
              f"lease        {leased}\n"
              f"serving      version {r['serving_version']} ({', '.join(r['tables'])})")
    return 0
