"""The read tables the query side reads, named in this one place.

Issue 4 rebuilds read tables under new names and switches the query side over in one
transaction; every query takes its table names from here, at call time, and nothing
caches rows or names beyond a request.
"""

from __future__ import annotations

TASKS = "read_tasks"
HISTORY = "read_task_history"
STATS = "read_user_stats"
CHECKPOINTS = "projection_checkpoints"
# The event store, read only by /api/ready to measure how far behind the tables are.
EVENTS = "tasks_events"

# The projections whose checkpoints tell how far the read tables above have caught
# up (the projector's `PROJECTION`; the three tables share one checkpoint). A read's
# position is the lowest of them; empty would mean "every checkpoint row".
PROJECTIONS: tuple[str, ...] = ("task_views",)

# The channel the projector NOTIFYs after each committed batch.
ADVANCED_CHANNEL = "projection_advanced"
