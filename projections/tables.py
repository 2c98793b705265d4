"""The names of the read tables the projector writes, in this one place.

Every read model formats its SQL with a `Tables`, so the same handlers can build a
fresh set of tables under other names (issue 4: rebuild, then switch atomically).
The query side keeps its own copy of the default names (`query_api/tables.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS = "read_tasks"
HISTORY = "read_task_history"
STATS = "read_user_stats"
CHECKPOINTS = "projection_checkpoints"

# After each committed batch: NOTIFY projection_advanced, '<position>'.
ADVANCED_CHANNEL = "projection_advanced"


@dataclass(frozen=True)
class Tables:
    tasks: str = TASKS
    history: str = HISTORY
    stats: str = STATS
    checkpoints: str = CHECKPOINTS


DEFAULT = Tables()
