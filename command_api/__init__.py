"""The command side: HTTP in, commands checked against each task's history, events out.

`routes` (the route table, the one handler, HTTP errors) -> `bodies` (request bodies) ->
`commands` (command values) -> `executor` (load, decide, save; `ports` is what it needs
of a store) -> `decisions` (pure rules). `store` is the PostgreSQL event store, with
`batching` (group commit); `app` wires them; `seed` writes the demo data.

Imports `shared` only. Nothing here is imported by `query_api` or `projections`."""
