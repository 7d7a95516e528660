"""MPI steps of a flow run that the ``clusterflow-slurm`` pool placed on Slurm run as ``srun``
job steps inside that flow run's own allocation: not as new sbatch jobs, not as a bare
mpiexec outside Slurm's view.

The end-to-end test deploys clusterflow's own ``hpc-pipeline`` flow on the pool (2 tasks) with
a steps spec whose 2-rank MPI step (default launcher, backend ``local``) records, from every
rank, its MPI size and the Slurm job and step it runs in. The unit tests pin the choice of
launcher inside an allocation: srun by default, the spec's explicit launcher when it names one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.backends import open_backend
from flows.spec import load_spec, step_plan
from flows.steps.launch import wrap
from infra.backends.launchers import SRUN_GUARD
from infra.backends.providers.allocation import AllocationProvider, current_allocation
from infra.clusters.slurm_local import LocalSlurm
from tests.conftest import REPO
from tests.slurm_fixtures import ensure_local_slurm
from tests.slurm_pool import create_pool, start_worker, stop_worker, wait_run

RANKS = REPO / "tests" / "fixtures" / "steps" / "ranks.py"


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _spec(tmp_path: Path, name: str, **step: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "ranks": 2, "scratch_dir": str(tmp_path / "scratch"),
        "steps": [{"name": "ranks", "ranks": 2,
                   "command": ["python", str(RANKS), "{out}", str(tmp_path / "ranks.json")],
                   **step}],
        "storage": {"input_bucket": f"{name}-in", "results_bucket": f"{name}-out"}}))
    return path


def test_a_flow_runs_mpi_steps_as_srun_steps_of_its_own_job(
        aws, local_slurm, prefect_api, tmp_path):
    spec = _spec(tmp_path, "instep")
    log = tmp_path / "worker.log"
    worker = None
    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        pool = create_pool(client, f"slurm-steps-{os.getpid()}", local_slurm.layout.conf,
                           tmp_path / "jobs", tasks=2)
        deployment = client.create_deployment(
            flow_id=client.create_flow_from_name("hpc-pipeline"), name="steps-on-slurm",
            work_pool_name=pool, entrypoint="flows/pipeline.py:hpc_pipeline", path=str(REPO),
            parameters={"spec_path": str(spec)},
            job_variables={"env": {"AWS_ENDPOINT_URL": aws.endpoint_url,
                                   "CLUSTERFLOW_HOME": str(tmp_path / "home")}},
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {
                "directory": str(REPO)}}])
        try:
            worker = start_worker(pool, prefect_api, log)
            run = client.create_flow_run_from_deployment(deployment)
            run = wait_run(client, run.id, lambda r: r.state.is_final(), timeout=400, log=log)
            assert run.state_name == "Completed", run.state.message
        finally:
            if worker is not None:
                stop_worker(worker)
    job_id = run.infrastructure_pid
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    # Two ranks of one MPI world (srun --mpi=pmix wired them up), both inside the flow run's
    # job as one job step of it (srun sets SLURM_STEP_ID; a new sbatch would be another job).
    assert [(r["rank"], r["size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert {r["SLURM_JOB_ID"] for r in ranks} == {job_id}
    steps = {r["SLURM_STEP_ID"] for r in ranks}
    assert len(steps) == 1 and steps.pop().isdigit()
    assert sorted(r["SLURM_PROCID"] for r in ranks) == ["0", "1"]


def test_inside_an_allocation_steps_default_to_srun_and_an_explicit_launcher_wins(
        aws, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert current_allocation() == "4242"
    argv = ["python", "x.py"]
    for backend in ("local", "slurm"):
        spec = load_spec(_spec(tmp_path, f"alloc-{backend}", backend=backend))
        spec = spec.model_copy(update={"backend": backend})
        step = step_plan(spec, tmp_path / "x.yaml").steps["ranks"]
        with open_backend(spec, aws, _Quiet()) as provider:
            assert provider.label == "slurm-step" and provider.allocation == "4242"
            # srun under the launch-failure guard (infra.backends.srun_guard)
            assert wrap(step, provider, backend, 2, argv)[1:6] == [
                str(SRUN_GUARD), "srun", "--mpi=pmix", "-n", "2"]
            chosen = step.model_copy(update={"launcher": "mpiexec"})
            assert Path(wrap(chosen, provider, backend, 2, argv)[0]).name == "mpiexec"
            none = step.model_copy(update={"launcher": "none"})
            assert wrap(none, provider, backend, 1, argv) == argv


def test_the_allocation_provider_runs_a_job_and_reports_its_exit(tmp_path):
    provider = AllocationProvider("4242", launcher="mpiexec")
    job = provider.submit(["sh", "-c", "echo hi; exit 5"], ranks=1, job_name="j",
                          workdir=tmp_path)
    from infra.backends.providers.polling import wait

    status = wait(provider, job, timeout=30)
    assert status.exit_code == 5 and job.stdout.read_text() == "hi\n"
    assert current_allocation({"SLURM_JOB_ID": ""}) is None
    assert current_allocation({}) is None


class _Quiet:
    def info(self, *args: object) -> None:
        pass
