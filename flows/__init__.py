"""Prefect flows of the continual loop (see each module). Importing this package first sets
Prefect's telemetry off, so every way in (`python -m flows.monitor`, `flows.deploy`,
`flows.demo`, tests) runs without it, not only `make`.

Prefect's anonymous telemetry would reach no network here, and its server heartbeat writes
to the same sqlite database as the flow run ("database is locked" tracebacks in the log).
The ephemeral server (a flow run without PREFECT_API_URL) gets 3 minutes to start instead of
Prefect's 20 s: the first start in a fresh clone creates and migrates its database, which on
a loaded 2-core machine took longer ("Timed out while attempting to connect to ephemeral
Prefect API server" ended a fresh `make demo` on 2026-12-03).
Set before any flow module imports Prefect; a value already in the environment wins.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the server's heartbeat
os.environ.setdefault("DO_NOT_TRACK", "1")  # the client SDK's usage events (the standard switch Prefect reads)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # first start: migrations
