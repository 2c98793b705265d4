"""A sealed twin of a seeded event store, for the replay's with/without comparison of
crypto-shredding (shared/datakeys.py).

`seed_replay_events` writes events with their fields open (as events stored before
sealing are), at a rate no command path reaches. `sealed_twin` copies them, in the same
order, into another initialised database with every personal field sealed as the command
API seals it: one data key per owner, made, wrapped by the run's DATA_MASTER_KEY and
stored in `user_data_keys` there. The replay of the twin against the replay of the
original then isolates what opening the fields costs a rebuild.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg

from shared.catalog import EVENTS_TABLE
from shared.datakeys import (
    INSERT_KEY,
    DataKey,
    MasterKeys,
    new_data_key,
    parse_master_keys,
    seal_fields,
)

PAGE = 20_000


def _key_for(owner: str, keys: dict[str, DataKey], master: MasterKeys,
             made: list[tuple[Any, ...]]) -> DataKey:
    key = keys.get(owner)
    if key is None:
        key, raw = new_data_key(owner)
        wrapped_by, wrapped = master.wrap(owner, key.key_id, raw)
        made.append((key.key_id, owner, wrapped_by, wrapped))
        keys[owner] = key
    return key


def sealed_twin(source_url: str, target_url: str, master_key: str) -> tuple[int, float]:
    """Copy every event of `source_url` into `target_url` (initialised, empty) with its
    fields sealed; (events, seconds)."""
    master = MasterKeys(tuple(parse_master_keys(master_key)))
    keys: dict[str, DataKey] = {}
    owners: dict[Any, str] = {}
    made: list[tuple[Any, ...]] = []
    count = 0
    started = time.perf_counter()
    with psycopg.connect(source_url) as src, psycopg.connect(target_url) as dst:
        with src.cursor(name="events") as cur, dst.cursor().copy(
            f"COPY {EVENTS_TABLE} (originator_id, originator_version, topic, state) FROM STDIN"
        ) as copy:
            cur.execute(f"SELECT originator_id, originator_version, topic, state FROM {EVENTS_TABLE}"
                        " ORDER BY tx_id, notification_id")
            while rows := cur.fetchmany(PAGE):
                for task_id, version, topic, state in rows:
                    data = json.loads(bytes(state))
                    owner = data.get("owner") or owners.get(task_id) or data["actor"]
                    owners.setdefault(task_id, owner)
                    sealed = seal_fields(_key_for(owner, keys, master, made), data)
                    if sealed != data:
                        state = json.dumps(sealed, separators=(",", ":"),
                                           ensure_ascii=False).encode()
                    copy.write_row((task_id, version, topic, bytes(state)))
                    count += 1
        with dst.cursor() as c:
            c.executemany(INSERT_KEY.replace("$1", "%s").replace("$2", "%s")
                          .replace("$3", "%s").replace("$4", "%s"), made)
        dst.execute(f"ANALYZE {EVENTS_TABLE}")
        dst.commit()
    return count, time.perf_counter() - started
