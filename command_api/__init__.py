"""The command side: HTTP in, commands checked against each task's history, events out.

Imports `shared` only. Nothing here is imported by `query_api` or `projections`."""
