"""FSx for Lustre: what moto has against the embedded endpoint, the rest through Stubber.

Stubber validates every request against botocore's FSx service model, so a wrong parameter
name or shape fails here exactly as it would against AWS.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

import boto3
import pytest
from botocore.stub import ANY, Stubber

from flows.pipeline import ensure_bucket
from infra.staging.fsx import Fsx, FsxError, LustreFileSystemSpec, RepositoryLinkSpec, TaskProgress

SUBNET, SG = "subnet-0123456789abcdef0", "sg-0123456789abcdef0"
FS_ID = "fs-0123456789abcdef0"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def stubbed() -> Iterator[tuple[object, Stubber]]:
    client = boto3.session.Session().client(
        "fsx", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


def test_persistent_2_file_system_on_the_embedded_endpoint(aws):
    fsx = Fsx(aws, poll_seconds=0)
    spec = LustreFileSystemSpec(subnet_id=SUBNET, security_group_ids=[SG],
                                per_unit_storage_throughput=500, tags={"run": uuid.uuid4().hex})
    fs = fsx.create_file_system(spec)
    ready = fsx.wait_file_system(fs["FileSystemId"])
    assert ready["LustreConfiguration"]["DeploymentType"] == "PERSISTENT_2"
    assert ready["LustreConfiguration"]["PerUnitStorageThroughput"] == 500
    assert ready["StorageCapacity"] == 1200


def test_capacity_rules_are_checked_before_any_call():
    with pytest.raises(ValueError, match="multiple of 2400"):
        LustreFileSystemSpec(subnet_id=SUBNET, storage_capacity_gib=1300)
    with pytest.raises(ValueError, match="s3://"):
        RepositoryLinkSpec(data_repository_path="/not/s3")


def test_repository_link_with_import_and_export_policies(aws, stubbed):
    client, stub = stubbed
    link = RepositoryLinkSpec(file_system_path="/inputs",
                              data_repository_path="s3://bucket/inputs/",
                              imported_file_chunk_size_mib=1024,
                              auto_import=["NEW", "CHANGED"])
    assoc = {"AssociationId": "dra-0123456789abcdef0", "FileSystemId": FS_ID,
             "FileSystemPath": "/inputs", "DataRepositoryPath": "s3://bucket/inputs/"}
    stub.add_response(
        "create_data_repository_association",
        {"Association": {**assoc, "Lifecycle": "CREATING"}},
        {"FileSystemId": FS_ID, "FileSystemPath": "/inputs",
         "DataRepositoryPath": "s3://bucket/inputs/", "BatchImportMetaDataOnCreate": True,
         "ImportedFileChunkSize": 1024, "ClientRequestToken": ANY,
         "S3": {"AutoImportPolicy": {"Events": ["NEW", "CHANGED"]},
                "AutoExportPolicy": {"Events": ["NEW", "CHANGED", "DELETED"]}}})
    for state in ("CREATING", "AVAILABLE"):
        stub.add_response("describe_data_repository_associations",
                          {"Associations": [{**assoc, "Lifecycle": state}]},
                          {"AssociationIds": ["dra-0123456789abcdef0"]})
    fsx = Fsx(aws, client=client, poll_seconds=0)
    created = fsx.link_repository(FS_ID, link)
    assert fsx.wait_association(created["AssociationId"])["Lifecycle"] == "AVAILABLE"


def test_misconfigured_association_surfaces_the_reason(aws, stubbed):
    client, stub = stubbed
    stub.add_response("describe_data_repository_associations", {"Associations": [{
        "AssociationId": "dra-0123456789abcdef0", "Lifecycle": "MISCONFIGURED",
        "FileSystemPath": "/in", "DataRepositoryPath": "s3://b/in/",
        "FailureDetails": {"Message": "Access denied to the S3 bucket"}}]})
    with pytest.raises(FsxError, match="MISCONFIGURED: Access denied to the S3 bucket.*policy"):
        Fsx(aws, client=client, poll_seconds=0).wait_association("dra-0123456789abcdef0")


def _task(lifecycle: str, total: int, ok: int, failed: int, report: dict | None = None,
          failure: str | None = None) -> dict:
    t = {"TaskId": "task-0123456789abcdef0", "Lifecycle": lifecycle,
         "Type": "EXPORT_TO_REPOSITORY", "CreationTime": NOW, "FileSystemId": FS_ID,
         "Status": {"TotalCount": total, "SucceededCount": ok, "FailedCount": failed},
         "Report": report or {"Enabled": False}}
    if failure:
        t["FailureDetails"] = {"Message": failure}
    return t


def test_export_task_waits_with_progress(aws, stubbed):
    client, stub = stubbed
    stub.add_response("create_data_repository_task",
                      {"DataRepositoryTask": _task("PENDING", 0, 0, 0)},
                      {"Type": "EXPORT_TO_REPOSITORY", "FileSystemId": FS_ID,
                       "Paths": ["results/run-1"], "Report": {"Enabled": False},
                       "ClientRequestToken": ANY})
    for t in (_task("PENDING", 0, 0, 0), _task("EXECUTING", 10, 4, 0),
              _task("SUCCEEDED", 10, 10, 0)):
        stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [t]},
                          {"TaskIds": ["task-0123456789abcdef0"]})
    seen: list[TaskProgress] = []
    result = Fsx(aws, client=client, poll_seconds=0).export(
        FS_ID, ["results/run-1"], on_progress=seen.append)
    assert [(p.lifecycle, p.succeeded) for p in seen] == [
        ("PENDING", 0), ("EXECUTING", 4), ("SUCCEEDED", 10)]
    assert (result.lifecycle, result.succeeded, result.failed) == ("SUCCEEDED", 10, 0)


def test_failed_import_surfaces_failure_details_and_report_rows(aws, stubbed):
    client, stub = stubbed
    bucket = f"fsx-report-{uuid.uuid4().hex[:8]}"
    ensure_bucket(aws, bucket)
    # where FSx delivers the completion report: {path}/task-{id}/failures.csv
    aws.client("s3").put_object(
        Bucket=bucket, Key="reports/task-0123456789abcdef0/failures.csv",
        Body=b"inputs/a.h5,failed,S3ObjectNotFound\ninputs/b.h5,failed,AccessDenied\n")
    report = {"Enabled": True, "Path": f"s3://{bucket}/reports",
              "Format": "REPORT_CSV_20191124", "Scope": "FAILED_FILES_ONLY"}
    stub.add_response("create_data_repository_task",
                      {"DataRepositoryTask": _task("PENDING", 0, 0, 0, report)},
                      {"Type": "IMPORT_METADATA_FROM_REPOSITORY", "FileSystemId": FS_ID,
                       "Report": report, "ClientRequestToken": ANY})
    stub.add_response("describe_data_repository_tasks", {"DataRepositoryTasks": [
        _task("FAILED", 3, 1, 2, report, failure="2 files failed to import")]})
    with pytest.raises(FsxError) as info:
        Fsx(aws, client=client, poll_seconds=0).import_metadata(
            FS_ID, report_path=f"s3://{bucket}/reports/")
    msg = str(info.value)
    assert "ended FAILED: 2 of 3 files failed; 2 files failed to import" in msg
    assert "inputs/a.h5: S3ObjectNotFound; inputs/b.h5: AccessDenied" in msg
    assert f"s3://{bucket}/reports" in msg


def test_a_task_waits_while_another_one_runs_on_the_file_system(aws, stubbed):
    """FSx refuses a second task while one runs (DataRepositoryTaskExecuting, an error the
    service model declares): the start is retried with the same token until it is taken."""
    client, stub = stubbed
    tokens = []
    client.meta.events.register("before-parameter-build.fsx.CreateDataRepositoryTask",
                                lambda params, **_: tokens.append(params["ClientRequestToken"]))
    stub.add_client_error("create_data_repository_task", "DataRepositoryTaskExecuting",
                          "An existing data repository task is currently executing", 400)
    stub.add_response("create_data_repository_task",
                      {"DataRepositoryTask": _task("PENDING", 0, 0, 0)},
                      {"Type": "EXPORT_TO_REPOSITORY", "FileSystemId": FS_ID,
                       "Paths": ["/results/runs/r"], "Report": {"Enabled": False},
                       "ClientRequestToken": ANY})
    assert Fsx(aws, client=client, poll_seconds=0).start_task(
        FS_ID, "EXPORT_TO_REPOSITORY", ["/results/runs/r"]) == "task-0123456789abcdef0"
    assert len(tokens) == 2 and tokens[0] == tokens[1]
