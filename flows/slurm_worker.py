"""A Prefect worker that runs each flow run as a Slurm batch job: ``--type clusterflow-slurm``.

Registered through Prefect's ``prefect.collections`` entry point (pyproject.toml), so
``prefect worker start --pool P --type clusterflow-slurm`` finds it and ``prefect work-pool
create P --type clusterflow-slurm`` gets its job template. The template's variables
(partition, time limit, nodes, tasks, extra sbatch args, the Slurm config, where scripts and
logs go) are edited in the UI like any pool's.

Each flow run is submitted with ``sbatch`` through clusterflow's ``SlurmProvider`` (no REST
daemon): the batch script runs ``python -m prefect.engine`` for that flow run inside the
allocation, so MPI steps in it launch with ``srun`` on the allocated tasks. The Slurm job id
is the flow run's infrastructure pid. While the job lives the worker watches both sides:

- the job ends: COMPLETED leaves the state the engine reported; FAILED, TIMEOUT, NODE_FAIL,
  OUT_OF_MEMORY... make the run Crashed (non-zero status) unless the engine already set a
  final state; CANCELLED (someone ran ``scancel``) makes it Cancelled;
- the flow run turns Cancelling (the UI's Cancel, or the API): ``scancel``, then Cancelled.

Not yet: a restarted worker does not pick up the jobs its predecessor was watching (their
flow runs still end by the engine's own report, but a job Slurm kills is not mapped).
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelled, Crashed, StateType
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)
from pydantic import Field, field_validator

from infra.backends.providers.base import JobHandle, JobState
from infra.backends.providers.slurm import SlurmError, SlurmProvider, valid_time_limit

WORKER_TYPE = "clusterflow-slurm"
POLL_SECONDS = 1.0


def _time_limit(v: str | None) -> str | None:
    if v is not None and not valid_time_limit(v):
        raise ValueError(f"time_limit {v!r} is not a Slurm time (minutes, HH:MM:SS or "
                         "D-HH:MM:SS)")
    return v


class SlurmJobConfiguration(BaseJobConfiguration):
    """One flow run's sbatch settings, from the pool's template and the deployment."""

    partition: str | None = Field(default=None)
    time_limit: str | None = Field(default=None)
    nodes: int = Field(default=1, ge=1)
    tasks: int = Field(default=1, ge=1)
    sbatch_args: list[str] = Field(default_factory=list)
    slurm_conf: str | None = Field(default=None)
    working_dir: str | None = Field(default=None)

    _validate_time = field_validator("time_limit")(_time_limit)

    def prepare_for_flow_run(self, flow_run: FlowRun, *args: Any, **kwargs: Any) -> None:
        super().prepare_for_flow_run(flow_run, *args, **kwargs)
        # The job runs this worker's interpreter (the same install, on a shared filesystem).
        self.command = (self.command if self.command and "prefect flow-run execute"
                        not in self.command
                        else shlex.join([sys.executable, "-m", "prefect.engine"]))

    def provider(self) -> SlurmProvider:
        return SlurmProvider(partition=self.partition, time_limit=self.time_limit,
                             slurm_conf=self.slurm_conf,
                             sbatch_args=[f"--nodes={self.nodes}", *self.sbatch_args])


class SlurmVariables(BaseVariables):
    """What a pool's template exposes in the UI (and a deployment's job_variables set)."""

    partition: str | None = Field(default=None, description="Slurm partition (-p); default: "
                                  "the cluster's default partition.")
    time_limit: str | None = Field(default=None, title="Time limit",
                                   description="sbatch --time: minutes, HH:MM:SS or D-HH:MM:SS.")
    nodes: int = Field(default=1, ge=1, description="sbatch --nodes.")
    tasks: int = Field(default=1, ge=1, description="sbatch --ntasks: the ranks MPI steps "
                       "in the flow run can srun on.")
    sbatch_args: list[str] = Field(default_factory=list, title="Extra sbatch arguments",
                                   description="e.g. [\"--account=proj\", \"--qos=high\"].")
    slurm_conf: str | None = Field(default=None, title="SLURM_CONF", description="Slurm "
                                   "config; default: $SLURM_CONF, else the local Slurm of "
                                   "`make slurm`, else /etc/slurm/slurm.conf.")
    working_dir: str | None = Field(default=None, title="Working directory", description=
                                    "Where batch scripts and job logs go (shared with the "
                                    "nodes); default: a temporary directory.")


class SlurmWorkerResult(BaseWorkerResult):
    """The Slurm job id and the flow run's exit status as Slurm saw it."""


class SlurmWorker(BaseWorker[SlurmJobConfiguration, SlurmVariables, SlurmWorkerResult]):
    type = WORKER_TYPE
    job_configuration = SlurmJobConfiguration
    job_configuration_variables = SlurmVariables
    _description = "Runs each flow run as a Slurm batch job (sbatch), on a Slurm cluster."
    _display_name = "Slurm (clusterflow)"
    _documentation_url = "https://slurm.schedmd.com/sbatch.html"

    async def run(self, flow_run: FlowRun, configuration: SlurmJobConfiguration,
                  task_status: Any = None) -> SlurmWorkerResult:
        provider = configuration.provider()
        workdir = Path(configuration.working_dir or tempfile.gettempdir()) / \
            f"prefect-{flow_run.id}"
        env = {k: v for k, v in configuration.env.items() if v is not None}
        job = await anyio.to_thread.run_sync(lambda: provider.submit(
            shlex.split(configuration.command or ""), ranks=configuration.tasks,
            job_name=f"prefect-{flow_run.name}", workdir=workdir, env=env))
        self._logger.info("flow run %s is Slurm job %s", flow_run.name, job.job_id)
        if task_status is not None:
            task_status.started(job.job_id)
        return await self.watch(flow_run, provider, job)

    async def watch(self, flow_run: FlowRun, provider: SlurmProvider,
                    job: JobHandle) -> SlurmWorkerResult:
        """Poll the job and the flow run until the job ends; map its end to the run."""
        while True:
            status = await anyio.to_thread.run_sync(provider.status, job)
            if status.state.terminal:
                break
            current = await self.client.read_flow_run(flow_run.id)
            if current.state and current.state.type == StateType.CANCELLING:
                self._logger.info("flow run %s is cancelling: scancel %s", flow_run.name,
                                  job.job_id)
                await anyio.to_thread.run_sync(provider.cancel, job)  # waits until it is gone
                # The engine, killed by scancel, reports Crashed on its way out (forced); the
                # run was cancelled, and says so once nothing of the job is left to object.
                await self.client.set_flow_run_state(
                    flow_run.id, Cancelled(message=f"cancelled: Slurm job {job.job_id} "
                                           "ended with scancel"), force=True)
                return SlurmWorkerResult(identifier=job.job_id, status_code=0)
            await anyio.sleep(POLL_SECONDS)
        current = await self.client.read_flow_run(flow_run.id)
        final = current.state is not None and current.state.is_final()
        if status.state is JobState.CANCELLED:  # scancel from outside Prefect
            if not final:
                await self.client.set_flow_run_state(
                    flow_run.id, Cancelled(message=f"Slurm job {job.job_id} was cancelled "
                                           "(scancel)"), force=True)
            return SlurmWorkerResult(identifier=job.job_id, status_code=0)
        code = 0 if status.state is JobState.COMPLETED else (status.exit_code or 1)
        if code and not final:
            await self.client.set_flow_run_state(
                flow_run.id, Crashed(message=f"Slurm job {job.job_id} ended "
                                     f"{status.message or status.state.value} (exit {code})"),
                force=True)
        return SlurmWorkerResult(identifier=job.job_id, status_code=code)

    async def kill_infrastructure(self, infrastructure_pid: str,
                                  configuration: SlurmJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        """Prefect's cancellation of a run that has not started yet: scancel its job."""
        provider = configuration.provider()
        job = JobHandle(job_id=infrastructure_pid, stdout=Path("/dev/null"),
                        stderr=Path("/dev/null"))
        try:
            await anyio.to_thread.run_sync(provider.cancel, job)
        except SlurmError as e:
            from prefect.exceptions import InfrastructureNotFound

            if "unknown" in str(e):
                raise InfrastructureNotFound(str(e)) from None
            raise
