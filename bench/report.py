"""The results: targets checked, a table on the terminal, and
`bench/results/<date>-<host>.json` and `.md` (`-2`, `-3`... for later runs that day)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.workload import COMMAND_KINDS, KINDS, QUERY_KINDS

# The targets.
STEADY_P95_MS = 25.0
STEADY_LIST_P95_MS = 60.0
LAG_P95_MS = 100.0
COMMAND_RATIO = 0.7
QUERY_RATIO = 0.8
# get and list against their honest ceilings (issue 22): the same SELECT, JSON by PostgreSQL.
READ_RATIO = {"get": 0.9, "list": 0.9}
# Reads with the read-your-own-writes check vs the same reads without it (issue 15).
SEALING_RATIO = 0.9
OWN_WRITES_RATIO = 0.9
REPLAY_EVENTS_PER_S = 20_000


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(figure: str, value: Any, target: str, ok: bool | None) -> None:
        out.append({"figure": figure, "value": value, "target": target, "ok": ok})

    steady = r.get("steady", {}).get("kinds", {})
    for kind in KINDS:
        if kind in steady:
            limit = STEADY_LIST_P95_MS if kind == "list" else STEADY_P95_MS
            p95 = steady[kind]["p95_ms"]
            add(f"steady p95 {kind} (ms)", p95, f"<= {limit:g}",
                None if p95 is None else p95 <= limit)
    if "lag" in r:
        p95 = r["lag"]["p95_ms"]
        add("projection lag p95 (ms)", p95, f"<= {LAG_P95_MS:g}",
            None if p95 is None else p95 <= LAG_P95_MS)
    sat = r.get("saturation", {}).get("kinds", {})
    for kind in KINDS:
        if kind in sat:
            row = sat[kind]
            limit = ratio_target(kind)
            add(f"saturation {kind} / {row['ceiling']}", row["ratio"], f">= {limit:g}",
                None if row["ratio"] is None else row["ratio"] >= limit)
    for kind, c in r.get("row_security", {}).get("kinds", {}).items():
        target = r["row_security"]["target"]
        add(f"row security {kind} with / without", c["with_vs_without"], f">= {target:g}",
            None if c["with_vs_without"] is None else c["with_vs_without"] >= target)
    if "replay" in r:
        eps = r["replay"]["events_per_s"]
        add("replay (events/s)", eps, f">= {REPLAY_EVENTS_PER_S:,}", eps >= REPLAY_EVENTS_PER_S)
    errors = error_total(r)
    add("errors", errors, "0", errors == 0)
    return out


def ratio_target(kind: str) -> float:
    if kind in READ_RATIO:
        return READ_RATIO[kind]
    return QUERY_RATIO if kind in QUERY_KINDS else COMMAND_RATIO


def error_total(r: dict[str, Any]) -> int:
    total = 0
    for section in ("steady", "saturation"):
        for row in r.get(section, {}).get("kinds", {}).values():
            total += row.get("errors", 0) + row.get("ceiling_errors", 0)
    total += sum(c.get("errors", 0) for c in r.get("saturation", {}).get("ceilings", {}).values())
    total += r.get("lag", {}).get("errors", 0)
    total += r.get("generator_ceiling", {}).get("errors", 0)
    for c in r.get("row_security", {}).get("kinds", {}).values():
        total += c["with"]["errors"] + c["without"]["errors"]
    return total


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _mark(ok: bool | None) -> str:
    return {True: "ok", False: "MISS", None: "-"}[ok]


def tables(r: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], str]]:
    """(title, header, rows, note) for each section."""
    out = []
    g = r.get("generator_ceiling")
    if g:
        out.append((
            "Load generator ceiling",
            ["target", "connections", "req/s (median)", "runs", "p50 ms", "errors"],
            [[g["target"], _f(g["connections"]), _f(g["rps"]), _f(g["rps_runs"]),
              _f(g["p50_ms"], 2), _f(g["errors"])]],
            "The generator's own limit: every req/s figure below must stay well under it.",
        ))
    s = r.get("steady")
    if s:
        rows = []
        for kind, k in s["kinds"].items():
            limit = STEADY_LIST_P95_MS if kind == "list" else STEADY_P95_MS
            rows.append([kind, _f(k["count"]), _f(k["errors"]), _f(k["p50_ms"]),
                         _f(k["p95_ms"]), _f(k["p99_ms"]), k["ceiling"], _f(k["ceiling_p95_ms"]),
                         _f(k["p95_vs_ceiling"], 2), f"<= {limit:g}",
                         _mark(None if k["p95_ms"] is None else k["p95_ms"] <= limit)])
        out.append((
            f"Steady load: {s['rate']:g} req/s open loop, {s['seconds']:g} s"
            f" ({s['requests']:,} requests; ceiling app {s['ceiling_seconds']:g} s)",
            ["kind", "n", "errors", "p50 ms", "p95 ms", "p99 ms", "ceiling", "ceiling p95",
             "p95 x ceiling", "target p95", ""],
            rows,
            f"Latency from each request's scheduled send time. Generator send lag p99"
            f" {_f(s['send_lag']['p99_ms'], 2)} ms. CPU: {_cpu(s['cpu'])}.",
        ))
    lag = r.get("lag")
    if lag:
        out.append((
            "Projection lag (command response -> visible in the query API)",
            ["n", "errors", "p50 ms", "p95 ms", "p99 ms", "max ms", "floor ms", "target p95", ""],
            [[_f(lag["count"]), _f(lag["errors"]), _f(lag["p50_ms"]), _f(lag["p95_ms"]),
              _f(lag["p99_ms"]), _f(lag["max_ms"]), _f(lag["floor_ms"]), f"<= {LAG_P95_MS:g}",
              _mark(None if lag["p95_ms"] is None else lag["p95_ms"] <= LAG_P95_MS)]],
            f"{lag['method']}. Floor: {lag['floor']}.",
        ))
    sat = r.get("saturation")
    if sat:
        rows = []
        for kind, k in sat["kinds"].items():
            limit = ratio_target(kind)
            rows.append([kind, _f(k["rps"]), _f(k["p50_ms"]), _f(k["p95_ms"]), _f(k["p99_ms"]),
                         _f(k["errors"]), k["ceiling"], _f(k["ceiling_rps"]), _f(k["ratio"], 2),
                         _f(k.get("ratio_paired"), 2), f">= {limit:g}",
                         _mark(None if k["ratio"] is None else k["ratio"] >= limit)])
        for name, c in sat["ceilings"].items():
            rows.append([f"({name})", _f(c["rps"]), _f(c["p50_ms"]), _f(c["p95_ms"]),
                         _f(c["p99_ms"]), _f(c["errors"]), "ceiling app", "", "", "", "", ""])
        out.append((
            f"Saturation: {sat['connections']} connections per kind, {sat['seconds']:g} s"
            f" after {sat['warmup']:g} s warm-up, median of {sat['repeats']}",
            ["kind", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "ceiling",
             "ceiling req/s", "ratio", "paired", "target", ""],
            rows,
            "Commands are compared with the bare insert; get with a bare one-row select by"
            " primary key, list with the user's whole list, history with the task's"
            " history, each its JSON built by PostgreSQL (bench/ceiling_app.py: no token"
            " check, no envelope, no position, same tables' shape). Each repetition runs a"
            " read beside its ceiling, alternating which goes first; paired: the median of"
            " the repetitions' ratios.",
        ))
        base = sat.get("table_lock_baseline") or {}
        if base:
            out.append((
                "Before/after the lock-free writer: the same commands against a command API"
                " on the library's table-locking writer (bench/locked_store.py), same run",
                ["kind", "table lock req/s", "p95 ms", "errors", "/ insert", "ours req/s",
                 "ours / table lock"],
                [[kind, _f(b["rps"]), _f(b["p95_ms"]), _f(b["errors"]), _f(b["ratio"], 2),
                  _f(sat["kinds"][kind]["rps"]), _f(b["ours_vs_table_lock"], 2)]
                 for kind, b in base.items()],
                "Ours: no table lock, events ordered by (tx_id, notification_id).",
            ))
        checks = sat.get("own_writes_check") or {}
        if checks:
            out.append((
                "Read-your-own-writes: the same reads against a query API without the check"
                " (bench/unchecked_reads.py), same run",
                ["kind", "without req/s", "p95 ms", "errors", "ours req/s", "ours / without",
                 "paired", "target", ""],
                [[kind, _f(c["rps"]), _f(c["p95_ms"]), _f(c["errors"]),
                  _f(sat["kinds"][kind]["rps"]), _f(c["ours_vs_unchecked"], 2),
                  _f(c.get("ours_vs_unchecked_paired"), 2),
                  f">= {OWN_WRITES_RATIO:g}",
                  _mark(None if c["ours_vs_unchecked"] is None
                        else c["ours_vs_unchecked"] >= OWN_WRITES_RATIO)]
                 for kind, c in checks.items()],
                "Without: the reader is not bound to the token's user, so the statement does"
                " not join the user's latest position and never waits for it. Each repetition"
                " runs the pair back to back, alternating which goes first; paired: the"
                " median of the repetitions' ratios.",
            ))
        sealing = sat.get("sealing") or {}
        if sealing:
            out.append((
                "Crypto-shredding: the same commands against a command API that seals"
                " nothing (bench/unsealed_store.py), same run",
                ["kind", "unsealed req/s", "p95 ms", "errors", "ours req/s", "ours / unsealed",
                 "paired", "target", ""],
                [[kind, _f(c["rps"]), _f(c["p95_ms"]), _f(c["errors"]),
                  _f(sat["kinds"][kind]["rps"]), _f(c["ours_vs_unsealed"], 2),
                  _f(c.get("ours_vs_unsealed_paired"), 2), f">= {SEALING_RATIO:g}",
                  _mark(None if c["ours_vs_unsealed"] is None
                        else c["ours_vs_unsealed"] >= SEALING_RATIO)]
                 for kind, c in sealing.items()],
                "Unsealed: the store's `sealing` off: fields stored open, no data key read,"
                " the appends check none. Each repetition runs the pair back to"
                " back, alternating which goes first; paired: the median of the"
                " repetitions' ratios.",
            ))
    rls = r.get("row_security")
    if rls:
        out.append((
            "Row-level security: the same reads with the policies and without them"
            " (bench/row_security.py), same run",
            ["kind", "with req/s", "p95 ms", "without req/s", "p95 ms", "errors",
             "with / without", "paired", "target", ""],
            [[kind, _f(c["with"]["rps"]), _f(c["with"]["p95_ms"]), _f(c["without"]["rps"]),
              _f(c["without"]["p95_ms"]), _f(c["with"]["errors"] + c["without"]["errors"]),
              _f(c["with_vs_without"], 2), _f(c["with_vs_without_paired"], 2),
              f">= {rls['target']:g}",
              _mark(None if c["with_vs_without"] is None
                    else c["with_vs_without"] >= rls["target"])]
             for kind, c in rls["kinds"].items()],
            f"With: {rls['with']}. Without: {rls['without']}. Each repetition runs the pair"
            " back to back, alternating which goes first; paired: the median of the"
            " repetitions' ratios.",
        ))
    rp = r.get("replay")
    if rp:
        out.append((
            "Replay: rebuild the read tables from the whole event log",
            ["events", "seconds", "events/s", "ceiling rows/s", "ratio", "target", ""],
            [[_f(rp["events"]), _f(rp["seconds"], 2), _f(rp["events_per_s"]),
              _f(rp["ceiling_rows_per_s"]), _f(rp["ratio"], 3), f">= {REPLAY_EVENTS_PER_S:,}",
              _mark(rp["events_per_s"] >= REPLAY_EVENTS_PER_S)]],
            f"Via {rp['via']}. Ceiling: {rp['ceiling']}.",
        ))
        split = [(name, c) for name, c in (("replay", rp.get("cpu")),
                                            ("ceiling", rp.get("ceiling_cpu"))) if c]
        if split:
            out.append((
                "Replay: where the time goes (CPU seconds, the median replay and the median"
                " ceiling)",
                ["run", "wall s", "ours CPU-s", "PostgreSQL CPU-s", "machine busy", "cores"],
                [[name, _f(c["wall_s"], 2), _f(c["ours_cpu_s"], 2), _f(c["postgres_cpu_s"], 2),
                  f"{_f(c['busy_pct'])}%", _f(c["cores"])] for name, c in split],
                "bench.stats.CpuSplit. Ours: the replay's processes (`taskctl replay`, its"
                " loader and fold processes), for the ceiling the harness's own client."
                " PostgreSQL: every postgres process of the machine (/proc, every 0.1 s)."
                " With the machine busy throughout, the wall time is about (ours +"
                " PostgreSQL) / cores.",
            ))
        sealing = rp.get("sealing")
        if sealing:
            out.append((
                "Replay with sealing: the same events with their fields sealed (as the command"
                " API writes them) and open (as stored before sealing), same run",
                ["sealed events/s", "open events/s", "sealed / open", "paired", "target", ""],
                [[", ".join(_f(v) for v in sealing["sealed_events_per_s"]),
                  ", ".join(_f(v) for v in sealing["open_events_per_s"]),
                  _f(sealing["ratio"], 2), _f(sealing["paired"], 2), f">= {SEALING_RATIO:g}",
                  _mark(None if sealing["ratio"] is None else sealing["ratio"] >= SEALING_RATIO)]],
                "The sealed store is a twin of the seeded one (bench/sealed_copy.py: one data"
                " key per owner, every title, description and tag sealed); the two are rebuilt"
                " in turn, alternating which goes first. The replay figure above is the"
                " sealed store's.",
            ))
    return out


def _cpu(cpu: dict[str, Any]) -> str:
    return ", ".join(f"{k.removesuffix('_core_pct').removesuffix('_pct')} {_f(v)}%"
                     for k, v in cpu.items())


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=False))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows]
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _headline(r: dict[str, Any]) -> list[str]:
    m, d, p = r["machine"], r.get("data", {}), r["pinning"]
    lines = [
        f"Machine: {m['host']}, {m['cores']} cores ({m['cpu_model']}), {m['memory_gb']} GB,"
        f" PostgreSQL {m['postgres']}, Python {m['python']}; load average at start"
        f" {m['load_average_at_start']}",
        f"Pinning: generator on CPUs {p['generator_cpus']}, servers ({p['servers']}) on"
        f" {p['server_cpus']}; replay {p.get('replay', 'on the server CPUs')};"
        f" PostgreSQL {p['postgres']}",
    ]
    if d:
        lines.append(
            f"Data: {d['users']} users x {d['tasks_per_user']} tasks = {d['events']:,} events,"
            f" seeded through the event store in {d['seed_seconds']} s"
            f" ({d['seed_events_per_s']:,}/s); the live projector caught up in"
            f" {d.get('projector_catch_up_seconds')} s"
            f" ({_f(d.get('projector_catch_up_events_per_s'))} events/s, including start-up)"
        )
    return lines


def render_text(r: dict[str, Any]) -> str:
    parts = [f"Task service benchmark, {r['run']['date']} ({r['run']['command']})"]
    parts += _headline(r)
    for title, header, rows, note in tables(r):
        parts += ["", title, _text_table(header, rows), note]
    met = [t for t in r["targets"] if t["ok"]]
    parts += ["", f"Targets: {len(met)} of {len(r['targets'])} met"]
    parts += [f"  MISS {t['figure']}: {_f(t['value'])} (target {t['target']})"
              for t in r["targets"] if t["ok"] is False]
    return "\n".join(parts)


def render_md(r: dict[str, Any]) -> str:
    parts = [f"# Benchmark {r['run']['date']} on {r['machine']['host']}", "",
             f"`{r['run']['command']}`, {r['run'].get('seconds')} s.", ""]
    parts += [f"- {line}" for line in _headline(r)]
    for title, header, rows, note in tables(r):
        parts += ["", f"## {title}", "", _md_table(header, rows), "", note]
    parts += ["", "## Targets", "",
              _md_table(["figure", "value", "target", ""],
                        [[t["figure"], _f(t["value"], 2), t["target"], _mark(t["ok"])]
                         for t in r["targets"]])]
    return "\n".join(parts) + "\n"


def finish(r: dict[str, Any], results_dir: Path) -> tuple[Path, Path]:
    r["targets"] = targets(r)
    r["errors_total"] = error_total(r)
    print("\n" + render_text(r), flush=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{r['run']['date'][:10]}-{r['machine']['host']}"
    # A second run on the same day and host gets -2, -3...: a kept result is never
    # overwritten.
    n, base = 1, stem
    while (results_dir / f"{stem}.json").exists() or (results_dir / f"{stem}.md").exists():
        n += 1
        stem = f"{base}-{n}"
    json_path, md_path = results_dir / f"{stem}.json", results_dir / f"{stem}.md"
    json_path.write_text(json.dumps(r, indent=2, default=str) + "\n")
    md_path.write_text(render_md(r))
    print(f"\nresults: {json_path} and {md_path}", flush=True)
    return json_path, md_path


__all__ = ["finish", "targets", "error_total", "COMMAND_KINDS"]
