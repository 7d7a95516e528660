"""The Slurm worker sweep's rules, on their own: who counts as live, its settings."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from prefect.client.schemas.objects import Worker

from flows.slurm_recovery import RecoverySettings, live_workers

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def _worker(name: str, seconds_ago: float | None, interval: int | None = 2) -> Worker:
    return Worker(name=name, work_pool_id="00000000-0000-0000-0000-000000000001",
                  heartbeat_interval_seconds=interval,
                  last_heartbeat_time=None if seconds_ago is None
                  else NOW - timedelta(seconds=seconds_ago))


def test_live_is_a_heartbeat_within_three_of_the_workers_own_intervals():
    workers = [_worker("fresh", 1), _worker("edge", 6), _worker("late", 6.5),
               _worker("never", None), _worker("default-interval", 89, interval=None),
               _worker("default-late", 91, interval=None)]
    assert live_workers(workers, NOW) == {"fresh", "edge", "default-interval"}
    assert live_workers(workers, NOW, multiple=4) == {"fresh", "edge", "late",
                                                      "default-interval", "default-late"}


def test_settings_come_from_the_environment_and_refuse_bad_values(monkeypatch):
    assert RecoverySettings.load().pending_grace_seconds == 300
    monkeypatch.setenv("CLUSTERFLOW_SLURM_PENDING_GRACE_SECONDS", "12.5")
    monkeypatch.setenv("CLUSTERFLOW_SLURM_SWEEP_SECONDS", "7")
    loaded = RecoverySettings.load()
    assert (loaded.pending_grace_seconds, loaded.sweep_seconds) == (12.5, 7)
    assert RecoverySettings.load(sweep_seconds=3).sweep_seconds == 3
    monkeypatch.setenv("CLUSTERFLOW_SLURM_SWEEP_SECONDS", "0")
    with pytest.raises(ValueError, match=r"^CLUSTERFLOW_SLURM_SWEEP_SECONDS='0': .*greater "
                       "than 0"):
        RecoverySettings.load()
    monkeypatch.setenv("CLUSTERFLOW_SLURM_SWEEP_SECONDS", "soon")
    with pytest.raises(ValueError, match="CLUSTERFLOW_SLURM_SWEEP_SECONDS='soon'"):
        RecoverySettings.load()
