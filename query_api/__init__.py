"""The query side: serves the per-user read tables. Imports `shared` only (never
`command_api` or `projections`)."""
