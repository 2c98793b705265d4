"""`taskctl`: the operator CLI and the composition root of every process the service
runs (the APIs, the projector, the one-port dev app, `db init`, replay, audit).

It may import every package of ours; nothing of ours imports it."""
