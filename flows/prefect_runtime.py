"""How clusterflow talks to Prefect when the user has not pointed it at a server.

With ``PREFECT_API_URL`` set, Prefect is used exactly as configured. Otherwise Prefect's own
temporary server runs against a SQLite database kept under the clusterflow state dir, so the
schema migration (~15 s) happens once, not on every run. The server-side services a single
CLI run never needs are switched off: the telemetry service in particular races the first
flow run for SQLite's write lock ("database is locked" tracebacks) and tries to reach the
internet. Must run before ``prefect`` is imported; every value is only a default.
"""

from __future__ import annotations

import os
from pathlib import Path

LOCAL_SERVER_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    # 2-core CI machines need longer than the 20 s default for the first (migrating) start.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def configure(state_dir: Path) -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    if os.environ.get("PREFECT_API_URL"):
        return
    home = Path(os.environ.setdefault("PREFECT_HOME", str(state_dir / "prefect")))
    home.mkdir(parents=True, exist_ok=True)  # Prefect's SQLite cannot create its folder
    for key, value in LOCAL_SERVER_DEFAULTS.items():
        os.environ.setdefault(key, value)
