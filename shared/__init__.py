"""Code shared by every process: settings, auth, envelopes, errors, the task vocabulary
and the event store. It imports nothing from `command_api`, `query_api` or
`projections` (the `taskctl` CLI in `taskctl.cli` is the composition root and imports
them lazily, inside its commands)."""
