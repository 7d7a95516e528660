"""A run's data through FSx for Lustre: import/auto-import in, export out, verified in S3.

The FSx calls go through botocore's Stubber (the embedded endpoint has no data repository
tasks), which checks every request and response against FSx's service model; S3 (the exported
objects, the failure report) is the embedded endpoint's.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.stub import ANY, Stubber

from infra.staging.fsx import Fsx, FsxError
from infra.staging.fsx_run import FsxLink, FsxRunStaging, VerifyError, links_from_config

REPO = Path(__file__).resolve().parents[3]
FS_ID = "fs-0123456789abcdef0"
TASK = "task-0123456789abcdef0"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def stubbed() -> Iterator[tuple[object, Stubber]]:
    client = boto3.session.Session().client(
        "fsx", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


def _task(kind: str, lifecycle: str, total: int, ok: int, failed: int = 0,
          report: str | None = None) -> dict:
    t = {"TaskId": TASK, "Lifecycle": lifecycle, "Type": kind, "CreationTime": NOW,
         "FileSystemId": FS_ID,
         "Status": {"TotalCount": total, "SucceededCount": ok, "FailedCount": failed}}
    if report:
        t["Report"] = {"Enabled": True, "Path": report, "Format": "REPORT_CSV_20191124",
                       "Scope": "FAILED_FILES_ONLY"}
    if lifecycle == "FAILED":
        t["FailureDetails"] = {"Message": "1 file failed to export"}
    return t


def _expect_task(stub: Stubber, kind: str, paths: list[str], report: str | None,
                 states: list[dict]) -> None:
    want_report = ({"Enabled": True, "Path": report, "Format": "REPORT_CSV_20191124",
                    "Scope": "FAILED_FILES_ONLY"} if report else {"Enabled": False})
    stub.add_response("create_data_repository_task",
                      {"DataRepositoryTask": states[0]},
                      {"Type": kind, "FileSystemId": FS_ID, "Paths": paths,
                       "Report": want_report, "ClientRequestToken": ANY})
    for t in states:
        stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [t]},
                          {"TaskIds": [TASK]})


def test_links_of_the_shipped_configs():
    od = links_from_config(yaml.safe_load(
        (REPO / "cluster_configs/efa-ondemand-us-east-2.yaml").read_text()))
    assert [(ln.file_system_path, ln.repository, ln.auto_import) for ln in od] == [
        ("/inputs", "s3://clusterflow-demo-inputs/", ("NEW", "CHANGED", "DELETED")),
        ("/results", "s3://clusterflow-demo-results/", ())]
    assert od[0].mounted(od[0].fs_path("clusterflow-demo-inputs", "inputs/a.npy")) == \
        "/fsx/inputs/inputs/a.npy"
    assert od[1].s3_key("/results/runs/r1/field.npy") == (
        "clusterflow-demo-results", "runs/r1/field.npy")
    spot = links_from_config(yaml.safe_load(
        (REPO / "cluster_configs/efa-spot-us-east-1.yaml").read_text()))
    assert [(ln.repository, ln.lazy, ln.export_only) for ln in spot] == [
        ("s3://clusterflow-demo-inputs/inputs/", True, False),
        ("s3://clusterflow-demo-inputs/exports/", False, True)]
    assert spot[0].fs_path("clusterflow-demo-inputs", "inputs/x.npy") == "/x.npy"


def test_stage_in_without_auto_import_runs_an_import_task_on_the_run_paths(aws, stubbed):
    client, stub = stubbed
    link = FsxLink("/fsx", "/inputs", "s3://in-bucket/data/")
    kind = "IMPORT_METADATA_FROM_REPOSITORY"
    _expect_task(stub, kind, ["/inputs/run1/a.npy"], None,
                 [_task(kind, "EXECUTING", 1, 0), _task(kind, "SUCCEEDED", 1, 1)])
    staging = FsxRunStaging(Fsx(aws, client=client, poll_seconds=0), FS_ID, [link])
    assert staging.stage_in("in-bucket", ["data/run1/a.npy"]) == ["/fsx/inputs/run1/a.npy"]


def test_stage_in_with_auto_import_waits_until_the_files_are_visible(aws, stubbed):
    client, _ = stubbed  # no FSx call at all: auto-import moves the data
    link = FsxLink("/fsx", "/inputs", "s3://in-bucket/", auto_import=("NEW",))
    looks = iter([[], [], ["/fsx/inputs/a.npy"]])
    seen: list[list[str]] = []

    def visible(paths: list[str]) -> list[str]:
        seen.append(paths)
        return next(looks)

    staging = FsxRunStaging(Fsx(aws, client=client, poll_seconds=0), FS_ID, [link],
                            visible=visible, poll_seconds=0, sleep=lambda _: None)
    assert staging.stage_in("in-bucket", ["a.npy"]) == ["/fsx/inputs/a.npy"]
    assert len(seen) == 3
    never = FsxRunStaging(Fsx(aws, client=client), FS_ID, [link], visible=lambda p: [],
                          visible_timeout=0, sleep=lambda _: None)
    with pytest.raises(FsxError, match="auto-import did not make 1 file"):
        never.stage_in("in-bucket", ["a.npy"])
    with pytest.raises(FsxError, match="under none of the file system's links"):
        never.stage_in("other-bucket", ["a.npy"])


def _results(aws, bucket: str, files: dict[str, bytes]) -> list[dict]:
    s3 = aws.client("s3")
    s3.create_bucket(Bucket=bucket)
    for name, body in files.items():
        s3.put_object(Bucket=bucket, Key=f"runs/r1/{name}", Body=body)
    return [{"name": n, "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()]


def test_stage_out_exports_and_verifies_every_result_in_s3(aws, stubbed):
    client, stub = stubbed
    bucket = f"fsxrun-{uuid.uuid4().hex[:8]}"
    files = _results(aws, bucket, {"field.npy": b"\x93NUMPY" + b"1" * 100, "manifest.json": b"{}"})
    kind = "EXPORT_TO_REPOSITORY"
    report = f"s3://{bucket}/fsx-reports"
    _expect_task(stub, kind, ["/results/runs/r1"], report,
                 [_task(kind, "PENDING", 0, 0), _task(kind, "EXECUTING", 2, 1),
                  _task(kind, "SUCCEEDED", 2, 2)])
    link = FsxLink("/fsx", "/results", f"s3://{bucket}/")
    staging = FsxRunStaging(Fsx(aws, client=client, poll_seconds=0), FS_ID, [link],
                            report_path=report)
    result = staging.stage_out(aws, "/results/runs/r1", files)
    assert (result.lifecycle, result.succeeded) == ("SUCCEEDED", 2)


def test_stage_out_refuses_bytes_that_are_not_the_manifests(aws, stubbed):
    client, stub = stubbed
    bucket = f"fsxrun-{uuid.uuid4().hex[:8]}"
    files = _results(aws, bucket, {"field.npy": b"written on lustre"})
    files.append({"name": "missing.npy", "sha256": "0" * 64})
    files[0] = {**files[0], "sha256": hashlib.sha256(b"what the ranks wrote").hexdigest()}
    kind = "EXPORT_TO_REPOSITORY"
    _expect_task(stub, kind, ["/results/runs/r1"], None, [_task(kind, "SUCCEEDED", 2, 2)])
    staging = FsxRunStaging(Fsx(aws, client=client, poll_seconds=0), FS_ID,
                            [FsxLink("/fsx", "/results", f"s3://{bucket}/")])
    with pytest.raises(VerifyError) as e:
        staging.stage_out(aws, "/results/runs/r1", files)
    assert "field.npy has sha256" in str(e.value) and "missing.npy is missing" in str(e.value)


def test_a_failed_export_surfaces_the_failure_report(aws, stubbed):
    client, stub = stubbed
    bucket = f"fsxrun-{uuid.uuid4().hex[:8]}"
    aws.client("s3").create_bucket(Bucket=bucket)
    report = f"s3://{bucket}/fsx-reports"
    aws.client("s3").put_object(
        Bucket=bucket, Key=f"fsx-reports/task-{TASK.removeprefix('task-')}/failures.csv",
        Body=b"FilePath,FileStatus,ErrorCode\n/results/runs/r1/field.npy,FAILED,"
             b"S3AccessDenied\n")
    kind = "EXPORT_TO_REPOSITORY"
    _expect_task(stub, kind, ["/results/runs/r1"], report,
                 [_task(kind, "FAILED", 2, 1, failed=1, report=report)])
    staging = FsxRunStaging(Fsx(aws, client=client, poll_seconds=0), FS_ID,
                            [FsxLink("/fsx", "/results", f"s3://{bucket}/")], report_path=report)
    with pytest.raises(FsxError) as e:
        staging.stage_out(aws, "/results/runs/r1", [])
    msg = str(e.value)
    assert "ended FAILED: 1 of 2 files failed" in msg
    assert "/results/runs/r1/field.npy: S3AccessDenied" in msg
