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
  A run cancelled before its job started also reaches ``scancel`` through Prefect's own
  cancellation observer (``kill_infrastructure``).

A worker can die (SIGKILL, a reboot of the login node) while its jobs run on: Slurm does not
need it. So a worker sweeps the pool's Pending, Running and Cancelling flow runs at its start
and every ``sweep_seconds`` after, and takes over those whose worker stopped (which ones, and
why only one live worker sweeps: ``flows.slurm_recovery``). A run with a Slurm job id is
watched as its own: a job still queued or running is watched to its end (a cancel issued now
still reaches ``scancel``); a job that ended meanwhile is mapped from what Slurm (the
controller, else the job completion log) says about it; a job Slurm has no record of makes the
run Crashed, saying so. A run left Pending without a job id is looked up in Slurm by its job's
name (``prefect-<flow run id>``): its job is adopted if there is one, else, once Pending for
``pending_grace_seconds``, the run goes back to Scheduled: a job is never submitted twice.
"""

from __future__ import annotations

import copy
import shlex
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import InfrastructureNotFound, ObjectNotFound
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Completed, Crashed, Scheduled, StateType
from prefect.workers.base import (
    BaseJobConfiguration,
    BaseVariables,
    BaseWorker,
    BaseWorkerResult,
)
from pydantic import Field, field_validator

from flows.slurm_recovery import (
    RecoverySettings,
    job_name,
    live_workers,
    owner,
    pending_seconds,
    utcnow,
)
from infra.backends.providers.base import JobHandle, JobState
from infra.backends.providers.slurm import (
    SlurmJobUnknown,
    SlurmProvider,
    SlurmUnavailable,
    valid_time_limit,
)

WORKER_TYPE = "clusterflow-slurm"
POLL_SECONDS = 1.0
# Flow runs whose job may still be alive, or whose end nobody has recorded yet.
ACTIVE = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
ADOPT_PAGE = 200  # the API's largest page


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

    _watching: set[UUID]
    _sweeping: bool = False
    _last_sweep: float | None = None

    def __init__(self, *args: Any, pending_grace_seconds: float | None = None,
                 sweep_seconds: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # `prefect worker start` passes only Prefect's options: these come from
        # CLUSTERFLOW_SLURM_PENDING_GRACE_SECONDS / CLUSTERFLOW_SLURM_SWEEP_SECONDS.
        self.recovery = RecoverySettings.load(pending_grace_seconds=pending_grace_seconds,
                                              sweep_seconds=sweep_seconds)

    async def run(self, flow_run: FlowRun, configuration: SlurmJobConfiguration,
                  task_status: Any = None) -> SlurmWorkerResult:
        provider = configuration.provider()
        workdir = Path(configuration.working_dir or tempfile.gettempdir()) / \
            f"prefect-{flow_run.id}"
        env = {k: v for k, v in configuration.env.items() if v is not None}
        self._watched().add(flow_run.id)
        # Named after the flow run's id: if this worker dies before the id is recorded, the
        # next sweep asks Slurm for the job by that name instead of submitting it again.
        job = await anyio.to_thread.run_sync(lambda: provider.submit(
            shlex.split(configuration.command or ""), ranks=configuration.tasks,
            job_name=job_name(flow_run.id), workdir=workdir, env=env))
        self._logger.info("flow run %s is Slurm job %s", flow_run.name, job.job_id)
        if task_status is not None:
            task_status.started(job.job_id)
        try:
            return await self.watch(flow_run, provider, job)
        finally:  # settled; or lost (the API failed): a later sweep takes it back by label
            self._watched().discard(flow_run.id)

    def _watched(self) -> set[UUID]:
        if not hasattr(self, "_watching"):
            self._watching = set()
        return self._watching

    # ---- the sweep: runs a stopped worker left behind (flows.slurm_recovery says which)

    async def sync_with_backend(self) -> None:
        """Prefect's sync (heartbeat, the pool's template); once the pool is known, and then
        every ``sweep_seconds``, it starts a sweep inside the worker's task group."""
        await super().sync_with_backend()
        due = self._last_sweep is None or \
            time.monotonic() - self._last_sweep >= self.recovery.sweep_seconds
        if due and not self._sweeping and self._work_pool is not None and \
                self._runs_task_group is not None:
            self._sweeping = True
            self._runs_task_group.start_soon(self._sweep_or_retry)

    async def _sweep_or_retry(self) -> None:
        try:
            await self.adopt_orphans()
            self._last_sweep = time.monotonic()
        except Exception:  # the API hiccuped: the next sync tries again, the worker goes on
            self._logger.exception("could not look for flow runs left by a stopped worker")
        finally:
            self._sweeping = False

    async def _active_runs(self) -> list[FlowRun]:
        runs: list[FlowRun] = []
        while True:  # page by page: a sweep can leave hundreds
            page = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=ACTIVE))),
                work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(
                    any_=[self.work_pool.name])),
                limit=ADOPT_PAGE, offset=len(runs))
            runs += page
            if len(page) < ADOPT_PAGE:
                return runs

    async def _live_workers(self) -> set[str]:
        workers = await self.client.read_workers_for_work_pool(self.work_pool.name)
        multiple = get_current_settings().server.services.foreman.inactivity_heartbeat_multiple
        return live_workers(workers, utcnow(), multiple) | {self.name}

    async def adopt_orphans(self) -> list[UUID]:
        """Take over the pool's active runs that no live worker holds: watch those with a
        Slurm job id, look up the job of those without one. Only the first live worker by
        name sweeps, but each takes back its own by name; return the ids of the runs
        taken."""
        runs = await self._active_runs()
        live = await self._live_workers()
        leads = min(live) == self.name
        taken = []
        for flow_run in runs:
            who = owner(flow_run)
            if flow_run.id in self._watched() or flow_run.id in self._submitting_flow_run_ids:
                continue  # watched (or being submitted) by this worker
            # Labelled with this worker's name but not watched: it ran before under the same
            # --name (restarted), and no other worker takes it while that name heartbeats.
            if who != self.name and (not leads or (who is not None and who in live)):
                continue  # a live worker's, or left to the sweeping worker
            pid = (flow_run.infrastructure_pid or "").strip()
            if pid.isdigit():
                self._watched().add(flow_run.id)
                self._logger.info("adopting flow run %s (%s): Slurm job %s, left by %s",
                                  flow_run.name, flow_run.state_name, pid,
                                  f"worker {who}, which stopped" if who else
                                  "a worker that stopped")
                self._runs_task_group.start_soon(self._adopt, flow_run, pid)
                taken.append(flow_run.id)
            else:  # died before the id reached Prefect (the job may run: Running)
                self._watched().add(flow_run.id)
                self._runs_task_group.start_soon(self._recover_unrecorded, flow_run)
                taken.append(flow_run.id)
        return taken

    async def _adopt(self, flow_run: FlowRun, job_id: str) -> None:
        try:
            await self._give_worker_labels_to_flow_run(flow_run.id)  # now this worker's
            configuration = await self._configuration_for(flow_run)
            job = JobHandle(job_id=job_id, stdout=Path("/dev/null"), stderr=Path("/dev/null"))
            await self.watch(flow_run, configuration.provider(), job)
        except Exception:  # one run's trouble must not stop the worker
            self._logger.exception("could not adopt flow run %s (Slurm job %s)", flow_run.name,
                                   job_id)
        finally:  # settled, or a later sweep tries again
            self._watched().discard(flow_run.id)

    async def _recover_unrecorded(self, flow_run: FlowRun) -> None:
        """A run left without a job id: adopt its job if Slurm has one; else, if it is
        Pending, put it back to Scheduled once Pending for ``pending_grace_seconds``; a
        Running or Cancelling one without a job is not a Slurm job of this pool's: left."""
        try:
            configuration = await self._configuration_for(flow_run)
            provider = configuration.provider()
            since = (flow_run.created or utcnow()) - timedelta(days=1)
            name = job_name(flow_run.id)
            jobs = await anyio.to_thread.run_sync(provider.jobs_named, name, since)
            pending = flow_run.state is not None and flow_run.state.type == StateType.PENDING
            if not jobs and not pending:
                self._logger.warning("flow run %s is %s without a Slurm job id, and Slurm has "
                                     "no job named %s: not a run this worker can settle",
                                     flow_run.name, flow_run.state_name, name)
                return  # stays in _watched: not looked at again
            waited = pending_seconds(flow_run, utcnow())
            if not jobs and waited >= self.recovery.pending_grace_seconds:
                current = await self.client.read_flow_run(flow_run.id)
                if current.state is None or flow_run.state is None or \
                        current.state.id != flow_run.state.id or current.infrastructure_pid:
                    self._watched().discard(flow_run.id)  # it moved on; a later sweep sees
                    return
                # The last look, right before acting: an sbatch that raced the first one.
                jobs = await anyio.to_thread.run_sync(provider.jobs_named, name, since)
                if not jobs:
                    await self._reschedule(flow_run, waited)
                    return
            if not jobs:  # too young to judge: the next sweep looks again
                self._watched().discard(flow_run.id)
                return
            if len(jobs) > 1:
                self._logger.warning("flow run %s has %d Slurm jobs named %s (%s): adopting "
                                     "%s", flow_run.name, len(jobs), name, ", ".join(jobs),
                                     jobs[-1])
            job_id = jobs[-1]
            self._logger.info("adopting flow run %s (%s, no job id recorded): Slurm job %s is "
                              "named %s", flow_run.name, flow_run.state_name, job_id, name)
            await self.client.update_flow_run(flow_run.id, infrastructure_pid=job_id)
            await self._adopt(flow_run, job_id)
        except Exception:
            self._watched().discard(flow_run.id)
            self._logger.exception("could not recover flow run %s (no Slurm job id recorded)",
                                   flow_run.name)

    async def _reschedule(self, flow_run: FlowRun, pending: float) -> None:
        why = (f"Pending for {pending:.0f} s without a Slurm job (none named "
               f"{job_name(flow_run.id)} in the queue or the job completion log) and no live "
               "worker holds it: its worker stopped before submitting it")
        result = await self.client.set_flow_run_state(
            flow_run.id, Scheduled(scheduled_time=utcnow(), message=f"rescheduled: {why}"))
        self._watched().discard(flow_run.id)
        if result.status == SetStateStatus.ACCEPT:
            self._logger.info("flow run %s: %s; put back to Scheduled", flow_run.name, why)
        else:
            self._logger.warning("flow run %s: %s; Prefect refused Scheduled (%s: %s)",
                                 flow_run.name, why, result.status.value,
                                 getattr(result.details, "reason", ""))

    async def _configuration_for(self, flow_run: FlowRun) -> SlurmJobConfiguration:
        """The job configuration the run was submitted with (pool template + deployment);
        the pool's defaults when its deployment is gone."""
        work_pool = copy.deepcopy(self.work_pool)
        try:
            return await self.job_configuration.resolve_for_flow_run(
                flow_run, client=self.client, work_pool=work_pool, worker_name=self.name,
                worker_id=self.backend_id)
        except ObjectNotFound:
            return await self.job_configuration.from_template_and_values(
                work_pool.base_job_template, {}, client=self.client)

    # ---- watching one job

    async def watch(self, flow_run: FlowRun, provider: SlurmProvider,
                    job: JobHandle) -> SlurmWorkerResult:
        """Poll the job and the flow run until the job ends; map its end to the run."""
        unreachable = False
        while True:
            try:
                status = await anyio.to_thread.run_sync(provider.status, job)
            except SlurmUnavailable as e:  # a controller restart must not orphan the run
                if not unreachable:
                    self._logger.warning("flow run %s: %s; retrying", flow_run.name, e)
                unreachable = True
                await anyio.sleep(5 * POLL_SECONDS)
                continue
            except SlurmJobUnknown as e:
                return await self._gone(flow_run, job, str(e))
            unreachable = False
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
        cancelling = current.state is not None and current.state.type == StateType.CANCELLING
        if status.state is JobState.CANCELLED or cancelling:  # scancel from outside Prefect
            if not final:
                await self.client.set_flow_run_state(
                    flow_run.id, Cancelled(message=f"Slurm job {job.job_id} was cancelled "
                                           f"(scancel; Slurm: {status.message or 'cancelled'})"),
                    force=True)
            return SlurmWorkerResult(identifier=job.job_id, status_code=0)
        code = 0 if status.state is JobState.COMPLETED else (status.exit_code or 1)
        if not final and code:
            await self.client.set_flow_run_state(
                flow_run.id, Crashed(message=f"Slurm job {job.job_id} ended "
                                     f"{status.message or status.state.value} (exit {code})"),
                force=True)
        elif not final:
            # Exit 0 without the engine's report (it lost the API at its end, or ended while
            # no worker watched and the report did not get through): Slurm's word stands.
            await self.client.set_flow_run_state(
                flow_run.id, Completed(message=f"Slurm job {job.job_id} completed (exit 0); "
                                       "the flow run did not report its end itself"),
                force=True)
        return SlurmWorkerResult(identifier=job.job_id, status_code=code)

    async def _gone(self, flow_run: FlowRun, job: JobHandle, why: str) -> SlurmWorkerResult:
        current = await self.client.read_flow_run(flow_run.id)
        if current.state is None or not current.state.is_final():
            await self.client.set_flow_run_state(
                flow_run.id, Crashed(message=f"{why}: its end was not recorded, so the flow "
                                     "run's outcome is unknown"), force=True)
        return SlurmWorkerResult(identifier=job.job_id, status_code=-1)

    async def kill_infrastructure(self, infrastructure_pid: str,
                                  configuration: SlurmJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        """Prefect's cancellation of a run that has not started yet: scancel its job."""
        provider = configuration.provider()
        job = JobHandle(job_id=infrastructure_pid, stdout=Path("/dev/null"),
                        stderr=Path("/dev/null"))
        try:
            await anyio.to_thread.run_sync(provider.cancel, job)
        except SlurmJobUnknown as e:
            raise InfrastructureNotFound(str(e)) from None
