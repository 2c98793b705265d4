"""The cost-growth curve's arithmetic and table (bench/scale_report.py), and the
sizes bench/scale.py accepts, without a database."""

from __future__ import annotations

import pytest

from bench import scale, scale_report


def steps(**overrides: list[float]) -> list[dict[str, object]]:
    """Three steps with a value for every promised column (flat unless overridden)."""
    sizes = [10_000, 100_000, 1_000_000]
    rows: list[dict[str, object]] = []
    for i, tasks in enumerate(sizes):
        row: dict[str, object] = {key: 100.0 + i for key, _ in scale_report.COLUMNS}
        row.update(tasks=tasks, users=tasks // 1000, events=4 * tasks,
                   database_bytes=3_000.0 * tasks, read_tables_bytes=2_000.0 * tasks,
                   seed_seconds=tasks / 50_000, replay_seconds=tasks / 20_000,
                   step_seconds=60 + tasks / 50_000 + tasks / 20_000)
        for key, values in overrides.items():
            row[key] = values[i]
        rows.append(row)
    return rows


@pytest.mark.parametrize(("values", "words"), [
    ([10.0, 10.5, 9.8], "flat"),
    ([1.0, 10.0, 100.0], "linear"),
    ([10.0, 20.0, 30.0], "logarithmic (+10 per tenfold)"),
    ([100.0, 1.0, 0.01], "falls linearly (inversely proportional)"),
    ([1.0, 1.1, 9.0], "power law, exponent 0.48"),
    ([83.0, 147.7, 862.5], "linear above a fixed base (+0.794 per 1,000 tasks)"),
    ([21_414.0, 49_750.0, 17_419.0], "no steady trend (between 17,419 and 49,750)"),
])
def test_states_how_a_line_grows_in_words(values: list[float], words: str):
    assert scale_report.growth([10_000, 100_000, 1_000_000], values)["words"] == words


def test_a_line_without_two_measured_points_is_not_measured():
    assert scale_report.growth([10, 100], [None, 5.0])["words"] == "not measured"


def test_table_has_every_promised_column_and_a_row_per_size():
    r = {"run": {"date": "2026-12-03T11:00:00+00:00", "command": "python -m bench --scale",
                 "seconds": 1.0, "tasks_per_user": 1000, "rate": 200.0, "steady_seconds": 30},
         "machine": {"host": "h", "cores": 2, "cpu_model": "c", "memory_gb": 1.0,
                     "postgres": "15", "python": "3.11", "load_average_at_start": [0.1]},
         "steps": steps(read_bytes_per_task=[1.0, 10.0, 100.0])}
    r["slopes"] = scale_report.slopes(r["steps"])
    r["estimate_next"] = scale_report.estimate_next(r["steps"])
    md = scale_report.render_md(r)
    lines = md.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("| tasks |"))
    header = lines[at]
    headers = [c.strip() for c in header.strip("|").split("|")]
    assert headers == [h for _, h in scale_report.COLUMNS]
    rows = lines[at + 2:lines.index("", at)]
    assert [row.split("|")[1].strip() for row in rows] == ["10,000", "100,000", "1,000,000"]
    for metric in scale_report.SLOPE_METRICS:
        assert metric in r["slopes"]
    assert "| read tables bytes/task | 1.000 | linear |" in md
    assert "10,000,000 tasks: an estimate" in md


def test_the_next_size_is_estimated_at_least_in_proportion():
    est = scale_report.estimate_next(steps())
    assert est is not None
    assert est["tasks"] == 10_000_000 and est["events"] == 40_000_000
    assert est["replay_seconds"] == 500  # 50 s x 10: linear in, linear out
    assert est["database_bytes"] == 30_000_000_000
    assert est["disk_peak_bytes"] == 50_000_000_000  # plus a second set of read tables


def test_sizes_must_be_whole_users():
    with pytest.raises(ValueError, match="not a multiple"):
        scale.users_for(10_500, 1000)
    assert scale.users_for(1_000_000, 1000) == 1000
