"""The kernel every process imports: settings, auth, the HTTP envelopes and errors, the
task vocabulary and its stored form, and every name the processes share in the
database. It imports nothing of ours."""
