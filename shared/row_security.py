"""Row-level security on the read tables: the names `taskctl db init` creates and the
query side uses (docs/operations.md, "Database roles").

The query API's role (`taskservice_query`) sees a read row only when its `user_id` is
the statement's user, which the reader sets in the statement itself
(`set_config(USER_SETTING, user, true)`: local to the statement's transaction, so a
pooled connection never carries a user to the next request). Unset, the setting is
NULL (or '' once set and reverted): no rows at all, whatever the query's WHERE says.

The live stream's hub reads the changes of every user with a stream open, in one
statement: it switches, for one transaction, to `STREAM_ROLE` (a role the query role
may SET ROLE to but does not inherit), whose policy admits the users of
USERS_SETTING (a text[] literal). One policy per role keeps the query role's an
equality the planner merges with the query's own `user_id = $1` (same plans, same
estimates; a one-time filter on the setting).
"""

from __future__ import annotations

USER_SETTING = "taskservice.user_id"
USERS_SETTING = "taskservice.user_ids"

# The query role's policy: the statement's user only (NULL or '' matches nothing).
USER_POLICY = "taskservice_query_own_rows"
USER_QUAL = f"user_id = current_setting('{USER_SETTING}', true)"

# The stream hub's role and policy: the users whose streams are open.
STREAM_ROLE = "taskservice_query_streams"
STREAMS_POLICY = "taskservice_streams_open_users"
USERS_QUAL = f"user_id = ANY (nullif(current_setting('{USERS_SETTING}', true), '')::text[])"

# The projector writes every user's rows.
PROJECTOR_POLICY = "taskservice_projector_all_rows"

# Whether a live task with this id belongs to another user (a 403 rather than a 404):
# yes or no, and nothing of the row. SECURITY DEFINER (the tables' owner, whom the
# policies do not bind), EXECUTE granted to the query role alone.
OWNED_ELSEWHERE_FUNCTION = "taskservice_task_owned_elsewhere"
