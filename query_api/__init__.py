"""The query side: serves each user's rows of the read tables, with the position they
reflect. Imports `shared` only (never `command_api` or `projections`: the read tables'
names come from `shared.catalog`)."""
