"""The projector, the replay and the audit: follow the event store into the per-user
read tables, rebuild them, check them. Imports `shared` only (never `command_api`)."""
