"""Every name the processes share in the database: tables, NOTIFY channels, projection
names and advisory-lock keys. A name changes here or nowhere."""

from __future__ import annotations

from dataclasses import dataclass, fields

# The event store (the eventsourcing recorder's tables, see `shared.eventstore`).
EVENTS_TABLE = "tasks_events"
IDEMPOTENCY_TABLE = "command_idempotency"
# Each user's latest event, written in the statement that appends it: a query compares
# it with the read tables' checkpoint, so a user reads their own writes without asking.
OWN_POSITIONS_TABLE = "user_write_positions"
# The service's own secrets, made by `taskctl db init` (the key positions are sealed with).
SERVICE_KEYS_TABLE = "service_keys"
# The command side NOTIFYs this after its commits; the projector LISTENs.
EVENTS_CHANNEL = EVENTS_TABLE

# The read side. One projection (one checkpoint) covers the three read tables: the
# task list's rows are the state the history's "from" values and the counts come from.
PROJECTION = "task_views"
PROJECTIONS: tuple[str, ...] = (PROJECTION,)
CHECKPOINTS_TABLE = "projection_checkpoints"
VERSIONS_TABLE = "projection_versions"
# After each committed batch: NOTIFY projection_advanced, '<position>'.
ADVANCED_CHANNEL = "projection_advanced"


@dataclass(frozen=True)
class Tables:
    """The read tables of one projection. Replay builds a second set under other names
    and renames it into place, so every read-model statement is formatted with one."""

    tasks: str = "read_tasks"
    history: str = "read_task_history"
    stats: str = "read_user_stats"
    checkpoints: str = CHECKPOINTS_TABLE

    @property
    def read_tables(self) -> tuple[str, ...]:
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "checkpoints")


LIVE = Tables()


# Advisory-lock keys: each lock is taken on `hashtextextended(key, 0)`, the key passed
# as a parameter.
DDL_LOCK = "taskservice.ddl"
PURGE_IDEMPOTENCY_LOCK = "taskservice.purge-idempotency"


def projector_lock(projection: str) -> str:
    return f"taskservice.projector:{projection}"


def replay_lock(projection: str) -> str:
    return f"taskservice.replay:{projection}"


# The live projector's lease, a row per projection (`projections.lease`): its holder,
# epoch and expiry; the heartbeat renews it, a standby takes a lapsed one over.
LEASES_TABLE = "projector_leases"
