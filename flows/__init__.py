"""Prefect flows of the continual loop (see each module). Importing this package first sets
Prefect's telemetry off, so every way in (`python -m flows.monitor`, `flows.deploy`,
`flows.demo`, tests) runs without it, not only `make`.

Prefect's anonymous telemetry would reach no network here, and its server heartbeat writes
to the same sqlite database as the flow run ("database is locked" tracebacks in the log).
Set before any flow module imports Prefect; a value already in the environment wins.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the server's heartbeat
os.environ.setdefault("DO_NOT_TRACK", "1")  # the client SDK's usage events (the standard switch Prefect reads)
