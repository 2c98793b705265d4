"""The projector: follows the event store and builds the per-user read tables.
Imports `shared` only (never `command_api`)."""
