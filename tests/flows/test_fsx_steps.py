"""A ``steps:`` pipeline on parallelcluster staged through FSx for Lustre, end to end.

As in tests/flows/test_fsx_pipeline.py: clusterflow runs "elsewhere" (scratch_dir is not the
cluster's remote_root), the cluster is the head-node stand-in (the provider's real batch
scripts against the local Slurm, real ranks), its FSx mount a directory, S3 the embedded moto
endpoint, and the data repository tasks go through botocore's Stubber (checked against FSx's
service model), whose hooks do what FSx would: an import brings objects onto the mount, an
export copies files to S3, a failed task leaves a failure report. The hooks also check the
order: no run manifest and no step.json of an exporting point in S3 while its export runs.

The graph: a 2-point heat sweep (the bundled kernel, tiny grid, 2 ranks each) and a fan-in
step running the user's own script (a local file, so it travels through S3 and the import
like any input) over both points' fields.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import yaml
from botocore.stub import ANY, Stubber

from flows.fsx_checks import uses_fsx
from flows.spec import SpecError, load_spec
from infra.clusters.slurm_local.cluster import LocalSlurm
from infra.staging.fsx_job import SUMS
from mpi_jobs.heat import reference_solution
from mpi_jobs.initial_conditions import heat_hotspots
from tests.flows.test_fsx_pipeline import World, expect_task, head_node
from tests.slurm_fixtures import ensure_local_slurm

LOG = logging.getLogger("test-fsx-steps")
ALPHAS = (0.1, 0.2)
SUMMARISE = """\
import pathlib, sys
import numpy as np
root, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
rows = [f"{p.parent.name} {float(np.load(p).sum())!r}" for p in sorted(root.glob("*/field.npy"))]
dest.write_text("\\n".join(rows) + "\\n")
"""


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def steps_world(aws: Any, tmp_path: Path, *, max_parallel: int = 2,
                reuse: bool = False, scratch: bool = False) -> World:
    """World's buckets, cluster config and file system, with a steps: spec."""
    world = World(aws, tmp_path, scratch=scratch)
    (tmp_path / "summarise.py").write_text(SUMMARISE)
    raw = yaml.safe_load(world.spec_path.read_text())
    del raw["kernel"]
    raw["reuse_result"] = reuse
    raw["steps"] = [
        {"name": "sim", "uses": "heat", "parameters": {"nx": 24, "ny": 18, "steps": 12},
         "sweep": {"alpha": list(ALPHAS), "max_parallel": max_parallel}},
        {"name": "total", "command": ["python", "{inputs.script}", "{inputs.fields}",
                                      "{out}/total.txt"],
         "inputs": {"fields": "steps.sim.outputs/field.npy", "script": "summarise.py"},
         "launcher": "none", "outputs": ["total.txt"]},
    ]
    world.spec_path.write_text(yaml.safe_dump(raw))
    return world


def expected_total() -> str:
    rows = [f"alpha={a} {float(reference_solution(heat_hotspots(18, 24), 12, a).sum())!r}"
            for a in ALPHAS]
    return "\n".join(rows) + "\n"


@contextlib.contextmanager
def fsx_stub(world: World, run_id: str, tasks: list[tuple[str, str]]) -> Iterator[Any]:
    """A stubbed FSx client answering ``tasks`` ((type, lifecycle), in order).

    Its hook plays FSx: an import copies each path's object onto the mount, an export puts
    every file under each path into S3 ("corrupt" in a lifecycle: total.txt's bytes change
    on the way; "FAILED": a failure report naming total.txt, nothing exported).
    """
    client = boto3.session.Session().client("fsx", region_name=world.region,
                                            aws_access_key_id="x", aws_secret_access_key="x")
    s3 = world.aws.client("s3")
    seen: list[tuple[str, list[str]]] = []
    lifecycles = [lc for _, lc in tasks]
    lock = threading.Lock()

    def simulate(params: dict[str, Any], **_: Any) -> None:
        with lock:
            kind, paths = params["Type"], params["Paths"]
            lifecycle = lifecycles[len(seen)]
            seen.append((kind, list(paths)))
        for path in paths:
            if kind == "IMPORT_METADATA_FROM_REPOSITORY":
                link, _, key = path.lstrip("/").partition("/")
                bucket = world.inputs if link == "inputs" else world.results
                dest = world.mount / path.lstrip("/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(dest))
                continue
            assert not world.manifest_in_s3(run_id), "run manifest published before an export"
            root = world.mount / path.lstrip("/")
            files = sorted(p for p in root.rglob("*") if p.is_file())
            names = {p.name for p in files}
            assert SUMS in names and not names & {"manifest.json", "step.json"}, names
            _, key = world.exported_to(f"{path.lstrip('/')}/step.json")
            assert "Contents" not in s3.list_objects_v2(Bucket=world.results, Prefix=key)
            if lifecycle.startswith("FAILED"):
                s3.put_object(Bucket=world.results,
                              Key=f"clusterflow-fsx-reports/{run_id}/task-0123456789abcdef0/"
                                  "failures.csv",
                              Body=f"{path}/total.txt,FAILED,S3AccessDenied\n".encode())
                continue
            for p in files:
                body = p.read_bytes()
                if lifecycle == "corrupt" and p.name == "total.txt":
                    body = body.replace(b"alpha", b"ALPHA")
                bucket, key = world.exported_to(p.relative_to(world.mount).as_posix())
                s3.put_object(Bucket=bucket, Key=key, Body=body)

    client.meta.events.register("before-parameter-build.fsx.CreateDataRepositoryTask",
                                simulate)
    report = world.report(run_id)
    with Stubber(client) as stub:
        for kind, lifecycle in tasks:
            state = "FAILED" if lifecycle.startswith("FAILED") else "SUCCEEDED"
            expect_task(stub, world.fs_id, report, kind, ANY, state, total=1,
                        failed=int(state == "FAILED"))
        client.seen = seen  # type: ignore[attr-defined]
        yield client


def run_flow(world: World, local_slurm: LocalSlurm, client: Any, run_id: str,
             prefect_api: str, monkeypatch: Any, tmp_path: Path,
             open_backend: Any = None) -> dict[str, Any]:
    """hpc_pipeline itself on the spec, the cluster the head-node stand-in."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    import flows.backends
    import flows.fsx_staging
    import flows.pipeline
    from infra.staging.fsx import Fsx

    monkeypatch.setenv("AWS_ENDPOINT_URL", world.aws.endpoint_url)
    monkeypatch.setenv("CLUSTERFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.backends, "open_backend",
                        open_backend or head_node(world, local_slurm))
    monkeypatch.setattr(flows.fsx_staging, "Fsx",
                        lambda target, **kw: Fsx(target, **{**kw, "client": client}))
    with temporary_settings(updates={PREFECT_API_URL: prefect_api,
                                     PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                     PREFECT_LOGGING_TO_API_ENABLED: False}):
        return flows.pipeline.hpc_pipeline(spec_path=str(world.spec_path), run_id=run_id)


def _get(world: World, key: str) -> bytes:
    return world.aws.client("s3").get_object(Bucket=world.results, Key=key)["Body"].read()


def _points(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{name}[{p['point']}]" if p["point"] else name: p
            for name, step in summary["steps"].items() for p in step["points"]}


IMPORT, EXPORT = "IMPORT_METADATA_FROM_REPOSITORY", "EXPORT_TO_REPOSITORY"


def test_a_staged_sweep_and_fan_in_publish_verified_outputs_then_the_manifest(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch):
    world = steps_world(aws, tmp_path)
    run_id = "steps-fsx-ok"
    assert uses_fsx(load_spec(world.spec_path))
    tasks = [(IMPORT, "SUCCEEDED")] + [(EXPORT, "SUCCEEDED")] * 3
    with fsx_stub(world, run_id, tasks) as client:
        summary = run_flow(world, local_slurm, client, run_id, prefect_api, monkeypatch,
                           tmp_path)
    # every input in one import task before the first step: the sample, the user's script
    kind, paths = client.seen[0]
    assert kind == IMPORT and len(paths) == 2
    assert any(p.endswith("/summarise.py") and "/clusterflow-local/" in p for p in paths)
    # each point's own folder exported (siblings finishing together may share a task)
    exported = [p for k, ps in client.seen[1:] for p in ps if k == EXPORT]
    assert sorted(exported) == sorted([f"/results/runs/{run_id}/sim/alpha={a}"
                                       for a in ALPHAS] + [f"/results/runs/{run_id}/total"])
    assert all(k == EXPORT for k, _ in client.seen[1:]) and len(client.seen) <= 4
    assert summary["state"] == "succeeded" and summary["points"] == {"total": 3, "failed": 0}
    assert {"cluster", "stage_in_fsx", "steps", "publish", "consume"} <= set(summary["seconds"])
    # the sweep went to the head node as ONE job array, an element per point
    sim = summary["steps"]["sim"]["points"]
    (array_id,) = {p["job_id"].split("_")[0] for p in sim}
    assert sorted(p["job_id"] for p in sim) == [f"{array_id}_{i}" for i in range(len(ALPHAS))]
    # the fan-in read both points' fields on the file system, through the links the job made
    prefix = f"runs/{run_id}/"
    assert _get(world, prefix + "total/total.txt").decode() == expected_total()
    manifest = json.loads(_get(world, prefix + "manifest.json"))
    assert manifest["state"] == "succeeded"
    for entry in manifest["files"]:  # every listed file is in S3 with that sha256
        assert hashlib.sha256(_get(world, prefix + entry["name"])).hexdigest() \
            == entry["sha256"]
    names = {e["name"] for e in manifest["files"]}
    assert {f"sim/alpha={a}/field.npy" for a in ALPHAS} | {"total/total.txt"} <= names
    field = np.load(io.BytesIO(_get(world, prefix + "sim/alpha=0.2/field.npy")))
    assert np.array_equal(field, reference_solution(heat_hotspots(18, 24), 12, 0.2))
    step_json = json.loads(_get(world, prefix + "sim/alpha=0.1/step.json"))
    assert step_json["kernel_manifest"]["files"]  # the kernel's own manifest, embedded
    assert all(q["verified"] == 1 for q in summary["fanout"]["queues"].values())
    # the points worked on the mount; the fan-in read the exported fields through links
    on_fsx = Path(world.remote_root) / run_id
    link = on_fsx / "total" / "in" / "fields" / "alpha=0.1" / "field.npy"
    assert link.resolve() == world.mount / "results" / "runs" / run_id / "sim" / "alpha=0.1" \
        / "field.npy"
    assert (on_fsx / "sim" / "alpha=0.2" / "out").is_dir()
    for name in ("sim.sbatch", "total.sbatch"):  # this machine's paths are not sent
        script = (on_fsx / name).read_text()
        assert "export PATH=" not in script and "export PYTHONPATH=" not in script
    # nothing but job logs and records went through this machine's scratch
    local = tmp_path / "local" / run_id
    assert not list(local.rglob("*.npy")) and not list(local.rglob("total.txt"))


def test_a_failed_export_fails_its_point_naming_the_report_in_one_line(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch):
    from flows.steps.flow import PipelineFailed

    world = steps_world(aws, tmp_path, max_parallel=1)  # exports in a known order
    run_id = "steps-fsx-failed"
    tasks = [(IMPORT, "SUCCEEDED"), (EXPORT, "SUCCEEDED"), (EXPORT, "SUCCEEDED"),
             (EXPORT, "FAILED")]
    with fsx_stub(world, run_id, tasks) as client, pytest.raises(PipelineFailed) as e:
        run_flow(world, local_slurm, client, run_id, prefect_api, monkeypatch, tmp_path)
    assert client.seen[-1] == (EXPORT, [f"/results/runs/{run_id}/total"])
    summary = e.value.summary
    assert summary["state"] == "failed" and summary["points"]["failed"] == 1
    error = _points(summary)["total"]["error"]
    assert "\n" not in error
    assert f"full report under s3://{world.results}/clusterflow-fsx-reports/{run_id}" in error
    assert f"/results/runs/{run_id}/total/total.txt: S3AccessDenied" in error
    assert f"the results stay at {world.mount}/results/runs/{run_id}/total on the file" in error
    s3 = aws.client("s3")
    listed = s3.list_objects_v2(Bucket=world.results, Prefix=f"runs/{run_id}/total/")
    assert "Contents" not in listed  # nothing of the failed point published
    manifest = json.loads(_get(world, f"runs/{run_id}/manifest.json"))
    assert manifest["state"] == "failed"
    assert not [f for f in manifest["files"] if f["name"].startswith("total/")]


def test_a_sha_mismatch_after_the_export_fails_the_point_and_it_is_not_published(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch):
    from flows.steps.flow import PipelineFailed

    world = steps_world(aws, tmp_path, max_parallel=1)
    run_id = "steps-fsx-corrupt"
    tasks = [(IMPORT, "SUCCEEDED"), (EXPORT, "SUCCEEDED"), (EXPORT, "SUCCEEDED"),
             (EXPORT, "corrupt")]
    with fsx_stub(world, run_id, tasks) as client, pytest.raises(PipelineFailed) as e:
        run_flow(world, local_slurm, client, run_id, prefect_api, monkeypatch, tmp_path)
    error = _points(e.value.summary)["total"]["error"]
    assert f"runs/{run_id}/total/total.txt has sha256 " in error and "not the manifest" in error
    assert "\n" not in error
    s3 = aws.client("s3")
    assert "Contents" not in s3.list_objects_v2(Bucket=world.results,
                                               Prefix=f"runs/{run_id}/total/step.json")
    manifest = json.loads(_get(world, f"runs/{run_id}/manifest.json"))
    assert manifest["state"] == "failed"
    assert not [f for f in manifest["files"] if f["name"].startswith("total/")]


def test_reuse_result_through_fsx_copies_in_s3_and_imports_what_a_later_step_reads(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch):
    world = steps_world(aws, tmp_path, reuse=True)
    first, second = "steps-fsx-reuse-1", "steps-fsx-reuse-2"
    with fsx_stub(world, first, [(IMPORT, "SUCCEEDED")] + [(EXPORT, "SUCCEEDED")] * 3) as c:
        run_flow(world, local_slurm, c, first, prefect_api, monkeypatch, tmp_path)
    with fsx_stub(world, second, [(IMPORT, "SUCCEEDED")] * 4) as client:
        summary = run_flow(world, local_slurm, client, second, prefect_api, monkeypatch,
                           tmp_path)
    points = _points(summary)
    assert {p["state"] for p in points.values()} == {"reused"}
    assert {p["computed_by"] for p in points.values()} == {first}
    assert all(k == IMPORT for k, _ in client.seen)  # nothing ran, nothing exported
    imported = [p for _, ps in client.seen[1:] for p in ps]
    # the sweep's fields (read by the fan-in) are back where the points would have written
    # them; the last step's output is read by nobody, so it is only copied in S3
    assert sorted(imported) == [f"/results/runs/{second}/sim/alpha={a}/field.npy"
                                for a in ALPHAS]
    prefix = f"runs/{second}/"
    assert _get(world, prefix + "total/total.txt").decode() == expected_total()
    manifest = json.loads(_get(world, prefix + "manifest.json"))
    for entry in manifest["files"]:
        assert hashlib.sha256(_get(world, prefix + entry["name"])).hexdigest() \
            == entry["sha256"]


def _edit(world: World, **changes: Any) -> None:
    raw = yaml.safe_load(world.spec_path.read_text())
    for step in raw["steps"]:
        step.update(changes.get(step["name"], {}))
    raw.update(changes.get("spec", {}))
    world.spec_path.write_text(yaml.safe_dump(raw))


def test_what_a_staged_steps_run_cannot_do_is_refused_at_load(aws, tmp_path):
    world = steps_world(aws, tmp_path)
    spec = load_spec(world.spec_path)
    assert uses_fsx(spec)
    _edit(world, total={"command": ["python", "{spec_dir}/summarise.py", "{out}"]})
    with pytest.raises(SpecError, match=r"steps\.total\.command: \{spec_dir\} and a relative "
                                        "executable name a folder on the machine"):
        load_spec(world.spec_path)
    _edit(world, total={"command": ["python", "{inputs.script}", "{out}"],
                        "backend": "local"})
    with pytest.raises(SpecError, match="steps.total.backend: local: a run staged through "
                                        "the cluster's FSx runs every step on parallel"):
        load_spec(world.spec_path)
    _edit(world, total={"command": ["./summarise.py", "{out}"], "backend": None})
    with pytest.raises(SpecError, match=r"steps\.total\.command: './summarise\.py': "):
        load_spec(world.spec_path)
    _edit(world, total={"command": ["python", "{inputs.fields}"], "backend": None,
                        "inputs": {"fields": "s3://not-linked/data.csv"}})
    with pytest.raises(SpecError, match=r"steps\.total\.inputs\.fields: s3://not-linked/data"
                                        r"\.csv is under none of the FSx links"):
        load_spec(world.spec_path)
    # on the head node (scratch_dir is remote_root) nothing of this applies
    _edit(world, total={"command": ["python", "{spec_dir}/summarise.py", "{out}"],
                        "inputs": {"fields": "steps.sim.outputs/field.npy"}},
          spec={"scratch_dir": world.remote_root})
    assert not uses_fsx(load_spec(world.spec_path))


def test_reuse_result_is_refused_where_results_cannot_come_back_onto_the_file_system(
        aws, tmp_path):
    """A SCRATCH file system exporting only to its ExportPath: a reused point's outputs could
    not be imported back for the next step, so reuse_result is refused, naming the fix."""
    world = steps_world(aws, tmp_path, scratch=True)
    assert uses_fsx(load_spec(world.spec_path))  # without reuse_result it stages
    _edit(world, spec={"reuse_result": True})
    with pytest.raises(SpecError, match=r"reuse_result needs the results prefix imported "
                                        r"back .* add a DataRepositoryAssociation for s3://"):
        load_spec(world.spec_path)


def test_dry_run_lists_the_fsx_calls_of_a_staged_steps_run(aws, tmp_path):
    from flows.planning.dryrun import FSX_ACTIONS, RUN_ACTIONS, run_actions

    world = steps_world(aws, tmp_path)
    assert run_actions(load_spec(world.spec_path)) == RUN_ACTIONS + FSX_ACTIONS
    _edit(world, spec={"scratch_dir": world.remote_root})
    assert run_actions(load_spec(world.spec_path)) == RUN_ACTIONS


def test_a_reclaimed_staged_point_resumes_from_its_checkpoints_on_the_mount(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch):
    """A Spot queue: the point's job is requeued mid-run (scontrol requeue, the reclaim), the
    same script runs again, the kernel resumes from the checkpoints in the point's folder on
    the file system, and the exported field is bitwise the uninterrupted one."""
    import subprocess
    import sys
    import time

    from infra.backends.providers.parallelcluster import ParallelClusterProvider
    from infra.backends.remote_shell import LocalShell
    from infra.clusters.slurm_local.layout import slurm_env
    from tests.flows.test_fsx_pipeline import REPO
    from tests.infra.backends.test_spot_array_requeue import SLOW, reclaim

    world = World(aws, tmp_path)
    raw = yaml.safe_load(world.spec_path.read_text())
    del raw["kernel"]
    params = {"nx": 192, "ny": 192, "steps": 800, "diag_every": 0, "alpha": 0.2}
    raw["steps"] = [{"name": "sim", "uses": "heat", "checkpoint_every": 100,
                     "parameters": params}]
    world.spec_path.write_text(yaml.safe_dump(raw))
    run_id = "steps-fsx-spot"
    # SLOW: each heat step sleeps 10 ms, so the reclaim hits a running job (it asserts so).
    env = {**slurm_env(local_slurm.layout.root), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONPATH": str(REPO), **SLOW}

    @contextlib.contextmanager
    def spot_head_node(spec: Any, aws: Any, logger: Any) -> Iterator[ParallelClusterProvider]:
        yield ParallelClusterProvider(LocalShell(env=env), remote_root=world.remote_root,
                                      run_as=None, python=sys.executable, requeue=True,
                                      max_interruptions=2)

    checkpoints = Path(world.remote_root) / run_id / "sim" / "checkpoints"
    done: list[str] = []

    def reclaimer(stop: threading.Event) -> None:
        while not stop.is_set():
            steps = [json.loads(c.read_text())["step"]
                     for c in checkpoints.glob("*/COMPLETE.json")] if checkpoints.is_dir() else []
            if max(steps, default=0) >= 300:
                ids = subprocess.run(["squeue", "-h", "-n", "sim", "-o", "%i"], env=env,
                                     capture_output=True, text=True).stdout.split()
                if ids:
                    reclaim(ids[0], env)
                    done.append(ids[0])
                    return
            time.sleep(0.1)

    stop = threading.Event()
    watcher = threading.Thread(target=reclaimer, args=(stop,), daemon=True)
    watcher.start()
    try:
        with fsx_stub(world, run_id, [(IMPORT, "SUCCEEDED"), (EXPORT, "SUCCEEDED")]) as client:
            summary = run_flow(world, local_slurm, client, run_id, prefect_api, monkeypatch,
                               tmp_path, spot_head_node)
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert done, "the point finished before it could be reclaimed"
    point = _points(summary)["sim"]
    assert point["state"] == "completed" and point["spot"]["interruptions"] == 1
    log = (tmp_path / "local" / run_id / "sim.out").read_text()  # the job's mirrored stdout
    assert "restarting from step" in log, log
    field = np.load(io.BytesIO(_get(world, f"runs/{run_id}/sim/field.npy")))
    assert np.array_equal(field, reference_solution(heat_hotspots(192, 192), 800, 0.2))


def test_a_local_spec_whose_steps_all_run_on_the_cluster_stages_through_fsx(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch):
    """``backend: local`` at the top, every step ``backend: parallelcluster``: the checks and
    the run look at each step's backend, so it stages through FSx like a parallelcluster
    spec (before, it ran the cluster's steps as if this machine's scratch were mounted)."""
    world = steps_world(aws, tmp_path)
    _edit(world, sim={"backend": "parallelcluster"}, total={"backend": "parallelcluster"},
          spec={"backend": "local"})
    spec = load_spec(world.spec_path)
    assert spec.backend == "local" and uses_fsx(spec)
    run_id = "steps-fsx-mixed"
    tasks = [(IMPORT, "SUCCEEDED")] + [(EXPORT, "SUCCEEDED")] * 3
    with fsx_stub(world, run_id, tasks) as client:
        summary = run_flow(world, local_slurm, client, run_id, prefect_api, monkeypatch,
                           tmp_path)
    assert summary["state"] == "succeeded" and summary["points"] == {"total": 3, "failed": 0}
    assert client.seen[0][0] == IMPORT
    exported = [p for k, ps in client.seen[1:] for p in ps if k == EXPORT]
    assert sorted(exported) == sorted([f"/results/runs/{run_id}/sim/alpha={a}"
                                       for a in ALPHAS] + [f"/results/runs/{run_id}/total"])
    assert all(p["backend"] == "parallelcluster" for p in _points(summary).values())
    assert _get(world, f"runs/{run_id}/total/total.txt").decode() == expected_total()
    # the points worked on the cluster's mount, not in this machine's scratch
    assert (Path(world.remote_root) / run_id / "sim" / "alpha=0.2" / "out").is_dir()
    assert not list((tmp_path / "local" / run_id).rglob("*.npy"))
