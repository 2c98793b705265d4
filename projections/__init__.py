"""The projector, the replay and the audit: follow the event store into the per-user
read tables, rebuild them, check them. The read models are listed in `manifest`; one
runner (`projector`) folds events into them, live or in bulk. Imports `shared` only
(never `command_api`)."""
