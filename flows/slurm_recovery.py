"""What the ``clusterflow-slurm`` worker's sweep decides about a pool's active flow runs.

A worker that dies leaves runs only a worker can settle. Slurm keeps their jobs; Prefect keeps
their states. The sweep (at worker start, then every ``sweep_seconds``) must tell a run a live
worker is handling, which it must not touch, from one whose worker is gone:

- Prefect labels each run it hands to a worker with that worker's name
  (``prefect.worker.name``), and each worker heartbeats to the pool. A run whose label names
  another worker that heartbeated within Prefect's own inactivity rule (3 heartbeat
  intervals, the server's ``foreman`` setting) is that worker's. The adopter relabels a run
  it takes, so it is its own from then on.
- Only one live worker sweeps: the one whose name sorts first among the pool's live workers.
  Two workers that sweep at once could both adopt, or one could put back to Scheduled a run
  the other had just claimed; with one sweeper they cannot (as long as their views of the
  heartbeats agree).
- A run that went Pending without a job id (the worker died between claiming it and
  ``sbatch``, or between ``sbatch`` and recording the id) is looked up in Slurm by its job's
  name, ``prefect-<flow run id>``: found, its id is recorded and the job adopted; not found
  and Pending longer than ``pending_grace_seconds``, it goes back to Scheduled so that a
  worker submits it again. The grace covers an ``sbatch`` whose request the controller got
  just as the worker died, and clocks that disagree about a heartbeat.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from uuid import UUID

from prefect.client.schemas.objects import FlowRun, Worker
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

WORKER_LABEL = "prefect.worker.name"  # set by Prefect's BaseWorker on every run it submits
DEFAULT_HEARTBEAT_SECONDS = 30  # PREFECT_WORKER_HEARTBEAT_SECONDS' default


class RecoverySettings(BaseSettings):
    """How the worker recovers runs a stopped worker left (``CLUSTERFLOW_SLURM_*``)."""

    model_config = SettingsConfigDict(env_prefix="CLUSTERFLOW_SLURM_")

    pending_grace_seconds: float = Field(default=300.0, ge=0, description=(
        "How long a run may stay Pending without a Slurm job before it is put back to "
        "Scheduled (only when no live worker holds it and Slurm has no job for it)."))
    sweep_seconds: float = Field(default=60.0, gt=0, description=(
        "How often a live worker looks for runs whose worker stopped (also at its start)."))

    @classmethod
    def load(cls, **overrides: float | None) -> RecoverySettings:
        """The settings from the environment and ``overrides``; a bad value is a one-line
        error naming the variable."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            name = f"CLUSTERFLOW_SLURM_{str(err['loc'][0]).upper()}"
            raise ValueError(f"{name}={err.get('input')!r}: {err['msg']}") from None


def job_name(flow_run_id: UUID) -> str:
    """The Slurm job name of a flow run: unique, so Slurm can be asked whether it exists."""
    return f"prefect-{flow_run_id}"


def owner(flow_run: FlowRun) -> str | None:
    """The worker Prefect last handed the run to (or that adopted it)."""
    return (flow_run.labels or {}).get(WORKER_LABEL) or None


def live_workers(workers: Iterable[Worker], now: datetime, multiple: int = 3) -> set[str]:
    """Names of the workers that heartbeated within ``multiple`` of their intervals: the
    rule Prefect's server uses to mark a worker offline."""
    live = set()
    for w in workers:
        if w.last_heartbeat_time is None:
            continue
        interval = w.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_SECONDS
        if (now - w.last_heartbeat_time).total_seconds() <= multiple * interval:
            live.add(w.name)
    return live


def pending_seconds(flow_run: FlowRun, now: datetime) -> float:
    """How long the run has been in its current (Pending) state."""
    if flow_run.state is None or flow_run.state.timestamp is None:
        return 0.0
    return (now - flow_run.state.timestamp).total_seconds()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
