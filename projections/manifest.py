"""The read models, listed once: db init, the runner, the replay (its load, its keys and
indexes, its leftovers, its switch), the verification and `projections status` iterate
`READ_MODELS` and never name a read table.

Every read-model module has one shape:

- `TABLE`: the field of `shared.catalog.Tables` that names its table (the query side
  reads the names there too);
- `tables(t, load=False)`: the CREATE TABLE statements (with `load`: the replay's fresh
  table for its bulk load, without what `keys(t)` adds back after it);
  `keys(t)`: the primary key and settings the load goes without; `indexes(t)`: the
  secondary indexes, built after the load;
- `Rows`: one batch's rows, `apply(event, before, after)` per event (its handlers per
  event type), `write(conn, t)` for the live sink, `copy(conn, t)` for the bulk sink;
- `QUERIES`: where its query SQL is (`query_api.queries`, which cannot import this).

`task_list` is also the fold's state (`STATE_MODEL`): its rows are the task states the
runner hands to every model as `before`/`after`.

Adding a read model: its module, a line in `READ_MODELS`, its table's field in
`shared.catalog.Tables`, its query in `query_api.queries`, and its expected rows in
`projections.verify`, which is deliberately an independent fold (it must not reuse the
handlers it checks), so it is written by hand for each model.
"""

from __future__ import annotations

from types import ModuleType

from projections import task_history, task_list, user_stats
from shared.catalog import EVENTS_TABLE, LIVE, PROJECTION, Tables

READ_MODELS: tuple[ModuleType, ...] = (task_list, task_history, user_stats)
STATE_MODEL = task_list

# Every projection (one checkpoint row each) and its live tables. One checkpoint covers
# every read model: the task list's rows are the state the others are derived from.
PROJECTIONS: dict[str, Tables] = {PROJECTION: LIVE}


def table_names(t: Tables) -> list[str]:
    """The read tables of `t`, in manifest order."""
    return [getattr(t, model.TABLE) for model in READ_MODELS]


def checkpoint_ddl(t: Tables = LIVE) -> list[str]:
    return [
        # (tx_id, position) is the last event applied, in the event store's global
        # order (see projections.projector); position is its notification id.
        f"CREATE TABLE IF NOT EXISTS {t.checkpoints} ("
        " projection text PRIMARY KEY, tx_id xid8 NOT NULL DEFAULT '0',"
        " position bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
        # Stores made before the global order: give old checkpoints the transaction id
        # of the event they name (old events share the migrating transaction's id).
        f"ALTER TABLE {t.checkpoints} ADD COLUMN IF NOT EXISTS tx_id xid8 NOT NULL DEFAULT '0'",
        f"DO $$ BEGIN IF to_regclass('{EVENTS_TABLE}') IS NOT NULL THEN"
        f" UPDATE {t.checkpoints} c SET tx_id = e.tx_id FROM {EVENTS_TABLE} e"
        " WHERE c.tx_id = '0' AND c.position > 0 AND e.notification_id = c.position;"
        " END IF; END $$",
    ]


def ddl(t: Tables = LIVE) -> list[str]:
    """Every statement `taskctl db init` runs for the read side; safe to run again."""
    statements = checkpoint_ddl(t)
    for model in READ_MODELS:
        statements.extend(model.tables(t))
        statements.extend(model.indexes(t))
    return statements


def load_ddl(t: Tables) -> list[str]:
    """The replay's fresh tables for its bulk load (`keys_and_indexes` after it)."""
    statements = checkpoint_ddl(t)
    for model in READ_MODELS:
        statements.extend(model.tables(t, load=True))
    return statements


def keys_and_indexes(t: Tables) -> list[str]:
    statements = []
    for model in READ_MODELS:
        statements.extend(model.keys(t))
    for model in READ_MODELS:
        statements.extend(model.indexes(t))
    return statements
