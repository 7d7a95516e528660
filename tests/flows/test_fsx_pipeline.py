"""The parallelcluster pipeline staged through FSx for Lustre, driven end to end.

clusterflow runs "elsewhere" (its scratch_dir is not the cluster's remote_root); the cluster is
the head-node stand-in of tests/infra/clusters/test_parallelcluster.py (the provider's real
batch scripts run by bash against the local Slurm, real ranks), its FSx mount a directory.
S3 and the FSx file system's tags are the embedded moto endpoint's; the data repository tasks
go through botocore's Stubber (moto lacks them), which checks each request against FSx's
service model. What FSx itself would do (an import task bringing an object onto the file
system, an export task copying files to S3, a failure report) is played by hooks on the stubbed
calls, which also check the ordering: no manifest in S3 while the export runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import yaml
from botocore.stub import ANY, Stubber

from flows.fsx_checks import uses_fsx
from flows.fsx_staging import run_through_fsx
from flows.run_inputs import input_key
from flows.spec import DEFAULT_SPEC, SpecError, load_spec
from infra.backends.providers.parallelcluster import ParallelClusterProvider
from infra.backends.remote_shell import LocalShell
from infra.clusters.slurm_local.cluster import LocalSlurm
from infra.clusters.slurm_local.layout import slurm_env
from infra.staging.fsx import FsxError
from infra.staging.fsx_job import SUMS
from infra.staging.fsx_run import VerifyError
from mpi_jobs.heat import reference_solution
from mpi_jobs.initial_conditions import heat_hotspots
from tests.slurm_fixtures import ensure_local_slurm

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 12, 7, tzinfo=timezone.utc)
LOG = logging.getLogger("test-fsx")


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


class World:
    """One run's buckets, config, spec and FSx mount."""

    def __init__(self, aws: Any, tmp_path: Path, *, auto_import: bool = False,
                 scratch: bool = False) -> None:
        self.scratch = scratch
        self.aws, self.tmp = aws, tmp_path
        tag = uuid.uuid4().hex[:8]
        self.inputs, self.results = f"fsxin-{tag}", f"fsxout-{tag}"
        for b in (self.inputs, self.results):
            aws.client("s3").create_bucket(Bucket=b)
        self.mount = tmp_path / "fsx"
        self.mount.mkdir()
        if scratch:  # SCRATCH_2: ImportPath (lazy) and ExportPath in the input bucket
            raw = yaml.safe_load((REPO / "cluster_configs/efa-spot-us-east-1.yaml").read_text())
            fsx = raw["SharedStorage"][0]
            fsx["FsxLustreSettings"].update(ImportPath=f"s3://{self.inputs}/inputs",
                                            ExportPath=f"s3://{self.inputs}/exports")
        else:  # PERSISTENT_2 with data repository associations
            raw = yaml.safe_load((REPO / "cluster_configs/efa-ondemand-us-east-2.yaml"
                                  ).read_text())
            fsx = raw["SharedStorage"][0]
            inputs, results = fsx["FsxLustreSettings"]["DataRepositoryAssociations"]
            inputs["DataRepositoryPath"] = f"s3://{self.inputs}"
            if not auto_import:
                del inputs["AutoImportPolicy"]
            results["DataRepositoryPath"] = f"s3://{self.results}"
        fsx["MountDir"] = str(self.mount)
        self.storage_name, self.region = fsx["Name"], raw["Region"]
        self.config = tmp_path / "cluster.yaml"
        self.config.write_text(yaml.safe_dump(raw))
        self.cluster = f"c{tag}"
        self.remote_root = str(self.mount / "clusterflow")
        spec = yaml.safe_load(DEFAULT_SPEC.read_text())
        spec.update(
            kernel={"name": "heat", "parameters": {"nx": 24, "ny": 18, "steps": 12,
                                                   "alpha": 0.2}},
            backend="parallelcluster", ranks=2, scratch_dir=str(tmp_path / "local"),
            storage={"input_bucket": self.inputs, "results_bucket": self.results},
            parallelcluster={"config": str(self.config), "cluster_name": self.cluster,
                             "remote_root": self.remote_root, "run_as": None,
                             "python": sys.executable})
        self.spec_path = tmp_path / "spec.yaml"
        self.spec_path.write_text(yaml.safe_dump(spec))
        # The file system ParallelCluster created for the cluster, found by its tags.
        fsx_region = dataclasses.replace(aws, region=self.region)  # the config's Region
        self.fs_id = fsx_region.client("fsx").create_file_system(
            FileSystemType="LUSTRE", StorageCapacity=1200, SubnetIds=["subnet-0123abcd"],
            LustreConfiguration={"DeploymentType": "PERSISTENT_2",
                                 "PerUnitStorageThroughput": 250},
            Tags=[{"Key": "parallelcluster:cluster-name", "Value": self.cluster},
                  {"Key": "Name", "Value": self.storage_name}])["FileSystem"]["FileSystemId"]

    def exported_to(self, rel: str) -> tuple[str, str]:
        """Where FSx exports the file-system path ``rel`` (no leading /)."""
        if self.scratch:
            return self.inputs, f"exports/{rel}"
        return self.results, rel.removeprefix("results/")

    def report(self, run_id: str) -> str:
        where = f"s3://{self.inputs}/exports/" if self.scratch else f"s3://{self.results}/"
        return f"{where}clusterflow-fsx-reports/{run_id}"

    def manifest_in_s3(self, run_id: str) -> bool:
        got = self.aws.client("s3").list_objects_v2(Bucket=self.results,
                                                    Prefix=f"runs/{run_id}/")
        return any(o["Key"].endswith("/manifest.json") for o in got.get("Contents", []))


@contextlib.contextmanager
def fsx_stub(world: World, run_id: str, *, export: str = "ok") -> Iterator[Any]:
    """A stubbed FSx client; its hooks do what the tasks would do on a real file system.

    ``export``: "ok", "corrupt" (one exported object's bytes differ) or "failed" (the task
    ends FAILED with a failure report in S3).
    """
    client = boto3.session.Session().client("fsx", region_name=world.region,
                                            aws_access_key_id="x", aws_secret_access_key="x")
    s3 = world.aws.client("s3")
    report = world.report(run_id)
    seen: list[str] = []

    def simulate(params: dict[str, Any], **_: Any) -> None:
        kind, (path,) = params["Type"], params["Paths"]
        seen.append(kind)
        if kind == "IMPORT_METADATA_FROM_REPOSITORY":  # /inputs/<key> <- s3://inputs/<key>
            key = path.removeprefix("/inputs/")
            dest = world.mount / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(world.inputs, key, str(dest))
            return
        assert not world.manifest_in_s3(run_id), "manifest published before the export"
        root = world.mount / path.lstrip("/")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        assert SUMS in {p.name for p in files} and "manifest.json" not in {p.name for p in files}
        for p in files:
            body = p.read_bytes()
            if export == "corrupt" and p.name == "field.npy":
                body = body[:-8] + b"\0" * 8
            bucket, key = world.exported_to(p.relative_to(world.mount).as_posix())
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        if export == "failed":
            s3.put_object(Bucket=world.results,
                          Key=f"clusterflow-fsx-reports/{run_id}/task-0123456789abcdef0/failures.csv",
                          Body=f"{path}/field.npy,FAILED,S3AccessDenied\n".encode())

    client.meta.events.register("before-parameter-build.fsx.CreateDataRepositoryTask",
                                simulate)
    with Stubber(client) as stub:
        def task(kind: str, paths: list[str], lifecycle: str = "SUCCEEDED",
                 failed: int = 0) -> None:
            expect_task(stub, world.fs_id, report, kind, paths, lifecycle, total=2,
                        failed=failed)

        client.expect = task  # type: ignore[attr-defined]
        client.seen = seen  # type: ignore[attr-defined]
        yield client


def expect_task(stub: Stubber, fs_id: str, report: str, kind: str, paths: Any,
                lifecycle: str, *, total: int, failed: int) -> None:
    """One data repository task as FSx answers it: created (the request checked against
    ``kind``, ``paths`` and the report settings), then described once in ``lifecycle``."""
    t = {"TaskId": "task-0123456789abcdef0", "Lifecycle": lifecycle, "Type": kind,
         "CreationTime": NOW, "FileSystemId": fs_id,
         "Report": {"Enabled": True, "Path": report, "Format": "REPORT_CSV_20191124",
                    "Scope": "FAILED_FILES_ONLY"},
         "Status": {"TotalCount": total, "SucceededCount": total - failed,
                    "FailedCount": failed}}
    if lifecycle == "FAILED":
        t["FailureDetails"] = {"Message": "1 file\nfailed to export"}
    stub.add_response("create_data_repository_task", {"DataRepositoryTask": t},
                      {"Type": kind, "FileSystemId": fs_id, "Paths": paths,
                       "Report": t["Report"], "ClientRequestToken": ANY})
    stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [t]},
                      {"TaskIds": ["task-0123456789abcdef0"]})


def head_node(world: World, local_slurm: LocalSlurm):
    """``open_backend`` for the run: the provider on the head-node stand-in."""
    env = {**slurm_env(local_slurm.layout.root), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONPATH": str(REPO)}

    @contextlib.contextmanager
    def open_backend(spec: Any, aws: Any, logger: Any) -> Iterator[ParallelClusterProvider]:
        yield ParallelClusterProvider(LocalShell(env=env), remote_root=world.remote_root,
                                      run_as=None, python=sys.executable)

    return open_backend


def timed(_: str, fn: Any, *args: Any) -> Any:
    return fn(*args)


def _run(world: World, local_slurm: LocalSlurm, client: Any, run_id: str) -> Any:
    spec = load_spec(world.spec_path)
    assert uses_fsx(spec)
    run_dir = (spec.scratch_dir / run_id).resolve()
    return run_through_fsx(spec, world.aws, run_dir, run_id, LOG, timed,
                           head_node(world, local_slurm), fsx_client=client)


def _expect(client: Any, world: World, run_id: str, **export: Any) -> None:
    client.expect("IMPORT_METADATA_FROM_REPOSITORY",
                  [f"/inputs/{input_key(load_spec(world.spec_path))}"])
    client.expect("EXPORT_TO_REPOSITORY", [f"/results/runs/{run_id}"], **export)


def test_fsx_staged_run_publishes_verified_results_then_the_manifest(aws, local_slurm,
                                                                    tmp_path):
    world = World(aws, tmp_path)
    run_id = "heat-fsx-ok"
    with fsx_stub(world, run_id) as client:
        _expect(client, world, run_id)
        spec, staged, record, sent = _run(world, local_slurm, client, run_id)
    assert client.seen == ["IMPORT_METADATA_FROM_REPOSITORY", "EXPORT_TO_REPOSITORY"]
    # the ranks read the input under the cluster's mount, not from this machine
    assert staged.path == world.mount / "inputs" / input_key(spec)
    assert not (tmp_path / "local" / run_id / "in").exists()
    assert world.manifest_in_s3(run_id) and sent[-1].uri.endswith(f"runs/{run_id}/manifest.json")
    s3 = aws.client("s3")
    field = s3.get_object(Bucket=world.results, Key=f"runs/{run_id}/field.npy")["Body"].read()
    got = np.load(io.BytesIO(field))
    assert np.array_equal(got, reference_solution(heat_hotspots(18, 24), 12, 0.2))
    published = json.loads(s3.get_object(Bucket=world.results,
                                         Key=f"runs/{run_id}/manifest.json")["Body"].read())
    assert published == record["manifest"]
    entry = next(f for f in published["files"] if f["name"] == "field.npy")
    assert entry["sha256"] == hashlib.sha256(field).hexdigest()
    # nothing of the run's outputs came through this machine's scratch but the manifest
    assert sorted(p.name for p in (tmp_path / "local" / run_id / "out").iterdir()) == [
        "manifest.json"]


def test_a_failed_export_fails_the_run_naming_the_report_and_paths(aws, local_slurm, tmp_path):
    world = World(aws, tmp_path)
    run_id = "heat-fsx-failed"
    with fsx_stub(world, run_id, export="failed") as client:
        _expect(client, world, run_id, lifecycle="FAILED", failed=1)
        with pytest.raises(FsxError) as e:
            _run(world, local_slurm, client, run_id)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"full report under s3://{world.results}/clusterflow-fsx-reports/{run_id}" in msg
    assert f"/results/runs/{run_id}/field.npy: S3AccessDenied" in msg
    assert f"the results stay at {world.mount}/results/runs/{run_id} on the file system" in msg
    assert not world.manifest_in_s3(run_id)


def test_a_sha_mismatch_after_export_fails_the_run(aws, local_slurm, tmp_path):
    world = World(aws, tmp_path)
    run_id = "heat-fsx-corrupt"
    with fsx_stub(world, run_id, export="corrupt") as client:
        _expect(client, world, run_id)
        with pytest.raises(VerifyError, match=rf"runs/{run_id}/field.npy has sha256 \w+, not"):
            _run(world, local_slurm, client, run_id)
    assert not world.manifest_in_s3(run_id)


def test_spec_chooses_fsx_staging_or_shared_mount_or_refuses(aws, tmp_path):
    world = World(aws, tmp_path)
    assert uses_fsx(load_spec(world.spec_path))
    raw = yaml.safe_load(world.spec_path.read_text())
    raw["scratch_dir"] = world.remote_root  # on the head node: the shared mount, as before
    world.spec_path.write_text(yaml.safe_dump(raw))
    assert not uses_fsx(load_spec(world.spec_path))
    raw["scratch_dir"] = str(tmp_path / "local")
    raw["storage"]["results_bucket"] = "not-linked-results"
    world.spec_path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as e:
        load_spec(world.spec_path)
    msg = str(e.value)
    assert "is not the cluster's shared storage parallelcluster.remote_root" in msg
    assert "no FSx link exports to s3://not-linked-results/runs/" in msg
    assert str(world.config) in msg


def test_the_flow_from_anywhere_fans_out_the_manifest_once_results_are_verified(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch):
    """hpc_pipeline itself: provision, FSx stage-in, ranks, export and verification, the
    manifest, and the fan-out queues each verifying that manifest's event."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    import flows.fsx_staging
    import flows.pipeline
    from infra.staging.fsx import Fsx

    world = World(aws, tmp_path)
    run_id = "heat-fsx-flow"
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint_url)
    monkeypatch.setenv("CLUSTERFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.pipeline, "open_backend", head_node(world, local_slurm))
    with fsx_stub(world, run_id) as client, \
            temporary_settings(updates={PREFECT_API_URL: prefect_api,
                                        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                        PREFECT_LOGGING_TO_API_ENABLED: False}):
        _expect(client, world, run_id)
        monkeypatch.setattr(flows.fsx_staging, "Fsx",
                            lambda target, **kw: Fsx(target, **{**kw, "client": client}))
        summary = flows.pipeline.hpc_pipeline(spec_path=str(world.spec_path), run_id=run_id)
        from prefect import get_client

        with get_client(sync_client=True) as prefect:  # the stages are tasks of the flow run
            names = {t.name.rsplit("-", 1)[0] for t in prefect.read_task_runs(limit=200)}
    assert {"stage_in", "stage_in_fsx", "mpi_run", "publish"} <= names
    assert client.seen == ["IMPORT_METADATA_FROM_REPOSITORY", "EXPORT_TO_REPOSITORY"]
    assert summary["backend"] == "parallelcluster" and summary["computed_by"] == run_id
    assert summary["s3"]["objects"][-1] == f"s3://{world.results}/runs/{run_id}/manifest.json"
    assert f"s3://{world.results}/runs/{run_id}/field.npy" in summary["s3"]["objects"]
    assert {"stage_in", "stage_in_fsx", "mpi_run", "publish", "consume"} <= set(
        summary["seconds"])
    for queue in summary["fanout"]["queues"].values():
        assert queue["verified"] == 1
    field = aws.client("s3").get_object(Bucket=world.results,
                                        Key=f"runs/{run_id}/field.npy")["Body"].read()
    assert hashlib.sha256(field).hexdigest() == summary["result_sha256"]


def test_a_scratch_file_system_loads_lazily_and_results_are_copied_to_the_results_prefix(
        aws, local_slurm, tmp_path, caplog):
    world = World(aws, tmp_path, scratch=True)
    run_id = "heat-scratch"
    spec = load_spec(world.spec_path)
    key = input_key(spec)
    with fsx_stub(world, run_id) as client:
        with pytest.raises(FsxError, match="its ImportPath lists only objects present when"):
            _run(world, local_slurm, client, run_id)  # uploaded after the file system existed
        # present when the file system was created: listed, loaded on first read
        aws.client("s3").download_file(world.inputs, key,
                                       str(world.mount / key.removeprefix("inputs/")))
        client.expect("EXPORT_TO_REPOSITORY", [f"/clusterflow/export/runs/{run_id}"])
        with caplog.at_level(logging.INFO, logger=LOG.name):
            _run(world, local_slurm, client, run_id)
    assert client.seen == ["EXPORT_TO_REPOSITORY"]  # no import task on a SCRATCH file system
    assert "loads lazily on the ranks' first read (no import task)" in caplog.text
    s3 = aws.client("s3")
    exported = s3.get_object(Bucket=world.inputs,
                             Key=f"exports/clusterflow/export/runs/{run_id}/field.npy")
    published = s3.get_object(Bucket=world.results, Key=f"runs/{run_id}/field.npy",
                              ChecksumMode="ENABLED")
    assert published["Body"].read() == exported["Body"].read()
    assert "ChecksumSHA256" in published  # S3 computed it on the copy; the flow compared it
    assert world.manifest_in_s3(run_id)


def test_auto_import_is_waited_for_on_the_head_node(aws, local_slurm, tmp_path):
    """With AutoImportPolicy NEW there is no import task: the head node is asked (test -e)
    until the object shows on the file system."""
    import threading

    world = World(aws, tmp_path, auto_import=True)
    run_id = "heat-autoimport"
    spec = load_spec(world.spec_path)
    key = input_key(spec)
    arrive = world.mount / "inputs" / key
    arrive.parent.mkdir(parents=True)
    from flows.fsx_staging import ensure_input

    ensure_input(spec, aws, tmp_path / "gen", LOG)
    later = threading.Timer(2.0, aws.client("s3").download_file,
                            (world.inputs, key, str(arrive)))
    later.start()
    with fsx_stub(world, run_id) as client:
        client.expect("EXPORT_TO_REPOSITORY", [f"/results/runs/{run_id}"])
        _, staged, _, _ = _run(world, local_slurm, client, run_id)
    later.join()
    assert client.seen == ["EXPORT_TO_REPOSITORY"] and staged.path == arrive
    assert world.manifest_in_s3(run_id)


def test_the_cli_refuses_a_spec_fitting_neither_way(aws, cli_env, tmp_path):
    from tests.conftest import run_cli

    world = World(aws, tmp_path)
    raw = yaml.safe_load(world.spec_path.read_text())
    raw["storage"]["input_bucket"] = "not-linked-inputs"
    world.spec_path.write_text(yaml.safe_dump(raw))
    proc = run_cli(["run", "--spec", str(world.spec_path)], cli_env, tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 2, proc.stderr  # the spec's form:
    assert lines[0].endswith("spec.yaml is invalid:")  # the file, then one line per problem
    assert "scratch_dir" in lines[1] and "s3://not-linked-inputs/" in lines[1]
    assert "is under none of its FSx links" in lines[1]
    assert not (tmp_path / "local").exists()


def test_dry_run_simulates_the_fsx_calls_of_a_staged_run(aws, tmp_path):
    from flows.planning.dryrun import FSX_ACTIONS, RUN_ACTIONS, run_actions

    world = World(aws, tmp_path)
    assert run_actions(load_spec(world.spec_path)) == RUN_ACTIONS + FSX_ACTIONS
    raw = yaml.safe_load(world.spec_path.read_text())
    raw["scratch_dir"] = world.remote_root
    world.spec_path.write_text(yaml.safe_dump(raw))
    assert run_actions(load_spec(world.spec_path)) == RUN_ACTIONS
    # every FSx action is one IAM knows (the service model's operation, prefixed)
    ops = set(boto3.session.Session().client(
        "fsx", region_name="us-east-1", aws_access_key_id="x",
        aws_secret_access_key="x").meta.service_model.operation_names)
    assert {a.removeprefix("fsx:") for a in FSX_ACTIONS} <= ops


def test_an_uploaded_field_sets_the_grid_from_its_header_in_s3(aws, local_slurm, tmp_path):
    """The grid comes from the .npy header read from S3 (a ranged GET), not a local copy."""
    from infra.staging.objects import upload

    world = World(aws, tmp_path)
    field = heat_hotspots(13, 17, seed=5)
    np.save(tmp_path / "mine.npy", field)
    upload(aws, tmp_path / "mine.npy", world.inputs, "inputs/uploads/mine.npy")
    raw = yaml.safe_load(world.spec_path.read_text())
    raw["kernel"]["input_key"] = "inputs/uploads/mine.npy"
    world.spec_path.write_text(yaml.safe_dump(raw))
    run_id = "heat-fsx-upload"
    with fsx_stub(world, run_id) as client:
        client.expect("IMPORT_METADATA_FROM_REPOSITORY", ["/inputs/inputs/uploads/mine.npy"])
        client.expect("EXPORT_TO_REPOSITORY", [f"/results/runs/{run_id}"])
        spec, _, _, _ = _run(world, local_slurm, client, run_id)
    p = spec.kernel.parameters
    assert (p.ny, p.nx) == (13, 17)
    out = aws.client("s3").get_object(Bucket=world.results,
                                      Key=f"runs/{run_id}/field.npy")["Body"].read()
    assert np.array_equal(np.load(io.BytesIO(out)), reference_solution(field, 12, 0.2))


def test_reuse_result_through_fsx_copies_the_earlier_result_in_s3_and_runs_nothing(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch):
    """The same kernel, parameters and input bytes: the second run's result is the first's,
    copied server side and verified in S3; no cluster is opened, no FSx task, no job."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    import flows.fsx_staging
    import flows.pipeline
    from infra.staging.fsx import Fsx

    world = World(aws, tmp_path)
    raw = yaml.safe_load(world.spec_path.read_text())
    raw["reuse_result"] = True
    world.spec_path.write_text(yaml.safe_dump(raw))
    opened = []
    stand_in = head_node(world, local_slurm)

    def open_backend(spec: Any, aws: Any, logger: Any) -> Any:
        opened.append(spec.parallelcluster.cluster_name)
        return stand_in(spec, aws, logger)

    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint_url)
    monkeypatch.setenv("CLUSTERFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(flows.pipeline, "open_backend", open_backend)
    summaries = []
    for run_id in ("heat-fsx-reuse-1", "heat-fsx-reuse-2"):
        with fsx_stub(world, run_id) as client, \
                temporary_settings(updates={PREFECT_API_URL: prefect_api,
                                            PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                            PREFECT_LOGGING_TO_API_ENABLED: False}):
            if not summaries:
                _expect(client, world, run_id)
            monkeypatch.setattr(flows.fsx_staging, "Fsx",
                                lambda target, c=client, **kw: Fsx(target, **{**kw, "client": c}))
            summaries.append(flows.pipeline.hpc_pipeline(spec_path=str(world.spec_path),
                                                         run_id=run_id))
            seen = list(client.seen)
        assert seen == ([] if len(summaries) == 2 else
                        ["IMPORT_METADATA_FROM_REPOSITORY", "EXPORT_TO_REPOSITORY"])
    first, second = summaries
    assert opened == [world.cluster]  # only the first run opened the cluster
    assert second["computed_by"] == first["run_id"] == "heat-fsx-reuse-1"
    assert "fetch_result" in second["seconds"] and "stage_in_fsx" not in second["seconds"]
    assert second["result_sha256"] == first["result_sha256"]
    s3 = aws.client("s3")
    field = s3.get_object(Bucket=world.results,
                          Key="runs/heat-fsx-reuse-2/field.npy")["Body"].read()
    assert hashlib.sha256(field).hexdigest() == first["result_sha256"]
    manifest = json.loads(s3.get_object(Bucket=world.results,
                                        Key="runs/heat-fsx-reuse-2/manifest.json")["Body"].read())
    assert manifest["reused_from"] == "heat-fsx-reuse-1"
    assert second["fanout"]["queues"]["postprocess"]["verified"] == 1
