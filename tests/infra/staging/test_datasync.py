"""DataSync: locations, tasks and executions on the embedded endpoint; the rest via Stubber."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from botocore.stub import Stubber

from infra.staging.datasync import (
    DataSync,
    DataSyncError,
    ExecutionProgress,
    TaskOptions,
    include_filter,
)

ROLE = "arn:aws:iam::123456789012:role/datasync-s3"
FSX_ARN = "arn:aws:fsx:us-east-1:123456789012:file-system/fs-0123456789abcdef0"
SG_ARN = "arn:aws:ec2:us-east-1:123456789012:security-group/sg-0123456789abcdef0"
LOC = "arn:aws:datasync:us-east-1:123456789012:location/loc-0123456789abcdef0"
EXEC = ("arn:aws:datasync:us-east-1:123456789012:task/task-0123456789abcdef0/"
        "execution/exec-0123456789abcdef0")


@pytest.fixture
def stubbed() -> Iterator[tuple[object, Stubber]]:
    client = boto3.session.Session().client(
        "datasync", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        yield client, stub
        stub.assert_no_pending_responses()


def test_s3_to_s3_task_runs_to_success_on_the_embedded_endpoint(aws):
    ds = DataSync(aws, poll_seconds=0)
    src = ds.s3_location("arn:aws:s3:::in-bucket", ROLE, "/inputs/")
    dst = ds.s3_location("arn:aws:s3:::out-bucket", ROLE, "/staged/")
    opts = TaskOptions(verify_mode="POINT_IN_TIME_CONSISTENT", transfer_mode="ALL")
    task = ds.create_task(src, dst, "stage-run-1", opts, includes=["/run-1", "/shared/*"])
    described = aws.client("datasync").describe_task(TaskArn=task)
    assert described["Options"]["VerifyMode"] == "POINT_IN_TIME_CONSISTENT"
    assert described["Options"]["TransferMode"] == "ALL"
    seen: list[ExecutionProgress] = []
    final = ds.run(task, includes=["/run-1"], on_progress=seen.append)
    assert final.status == "SUCCESS"
    assert [p.status for p in seen][-3:] == ["TRANSFERRING", "VERIFYING", "SUCCESS"]


def test_fsx_lustre_and_nfs_and_efs_locations_match_the_service_model(aws, stubbed):
    client, stub = stubbed
    stub.add_response("create_location_fsx_lustre", {"LocationArn": LOC},
                      {"FsxFilesystemArn": FSX_ARN, "SecurityGroupArns": [SG_ARN],
                       "Subdirectory": "/scratch/"})
    stub.add_response("create_location_nfs", {"LocationArn": LOC},
                      {"ServerHostname": "10.0.0.5", "Subdirectory": "/export/data",
                       "OnPremConfig": {"AgentArns": [
                           "arn:aws:datasync:us-east-1:123456789012:agent/agent-0123456789abcdef0"]},
                       "MountOptions": {"Version": "NFS4_1"}})
    stub.add_response("create_location_efs", {"LocationArn": LOC},
                      {"EfsFilesystemArn": "arn:aws:elasticfilesystem:us-east-1:123456789012:"
                                           "file-system/fs-0123abcd",
                       "Subdirectory": "/", "InTransitEncryption": "TLS1_2",
                       "Ec2Config": {"SubnetArn": "arn:aws:ec2:us-east-1:123456789012:subnet/"
                                                  "subnet-0123456789abcdef0",
                                     "SecurityGroupArns": [SG_ARN]}})
    ds = DataSync(aws, client=client)
    assert ds.fsx_lustre_location(FSX_ARN, [SG_ARN], "/scratch/") == LOC
    assert ds.nfs_location("10.0.0.5", "/export/data", [
        "arn:aws:datasync:us-east-1:123456789012:agent/agent-0123456789abcdef0"],
        version="NFS4_1") == LOC
    assert ds.efs_location("arn:aws:elasticfilesystem:us-east-1:123456789012:file-system/"
                           "fs-0123abcd",
                           "arn:aws:ec2:us-east-1:123456789012:subnet/subnet-0123456789abcdef0",
                           [SG_ARN]) == LOC


def test_execution_progress_and_failure_reason(aws, stubbed):
    client, stub = stubbed
    for status, done in (("LAUNCHING", 0), ("TRANSFERRING", 3 << 20)):
        stub.add_response("describe_task_execution", {
            "TaskExecutionArn": EXEC, "Status": status, "BytesTransferred": done,
            "EstimatedBytesToTransfer": 8 << 20, "FilesTransferred": 3,
            "EstimatedFilesToTransfer": 8}, {"TaskExecutionArn": EXEC})
    stub.add_response("describe_task_execution", {
        "TaskExecutionArn": EXEC, "Status": "ERROR", "BytesTransferred": 3 << 20,
        "Result": {"PrepareStatus": "SUCCESS", "TransferStatus": "ERROR",
                   "ErrorCode": "SockException", "ErrorDetail": "Connection reset by peer"},
        "FilesFailed": {"Prepare": 0, "Transfer": 5, "Verify": 0, "Delete": 0}})
    seen: list[ExecutionProgress] = []
    with pytest.raises(DataSyncError) as info:
        DataSync(aws, client=client, poll_seconds=0).wait_execution(EXEC,
                                                                   on_progress=seen.append)
    assert [p.bytes_transferred for p in seen] == [0, 3 << 20, 3 << 20]
    assert seen[1].line == f"TRANSFERRING: {3 << 20}/{8 << 20} bytes, 3 files"
    msg = str(info.value)
    assert "SockException: Connection reset by peer" in msg
    assert "transfer ERROR" in msg and "5 transfer" in msg


def test_include_filter_syntax():
    assert include_filter(["/a", "/b/*"]) == [{"FilterType": "SIMPLE_PATTERN",
                                              "Value": "/a|/b/*"}]
    with pytest.raises(ValueError, match="start with '/'"):
        include_filter(["a"])
    with pytest.raises(ValueError, match=r"contains '\|'"):
        include_filter(["/a|/b"])
