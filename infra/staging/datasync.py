"""AWS DataSync for bulk moves the stager should not do from one host: S3 <-> FSx/EFS/NFS.

DataSync copies between *locations* with a *task*; each run is an *execution* that goes
QUEUED -> LAUNCHING -> PREPARING -> TRANSFERRING -> VERIFYING -> SUCCESS/ERROR. The useful
settings for HPC staging are the verify mode (``ONLY_FILES_TRANSFERRED`` checks what it copied
end to end; ``POINT_IN_TIME_CONSISTENT`` re-reads both sides) and include filters, so one task
can move just a run's folder. :meth:`DataSync.wait_execution` reports bytes moved while it runs
and, on ERROR, DataSync's error code and detail instead of a bare status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from infra.aws.clients import AwsTarget

VerifyMode = Literal["ONLY_FILES_TRANSFERRED", "POINT_IN_TIME_CONSISTENT", "NONE"]
TERMINAL = ("SUCCESS", "ERROR")


class DataSyncError(RuntimeError):
    """A DataSync execution failed; the message has DataSync's error code and detail."""


class TaskOptions(BaseModel):
    """The DataSync task options that matter for staging (others keep DataSync's defaults)."""

    model_config = {"extra": "forbid"}

    verify_mode: VerifyMode = "ONLY_FILES_TRANSFERRED"
    transfer_mode: Literal["CHANGED", "ALL"] = "CHANGED"
    overwrite_mode: Literal["ALWAYS", "NEVER"] = "ALWAYS"
    preserve_deleted_files: Literal["PRESERVE", "REMOVE"] = "PRESERVE"
    log_level: Literal["OFF", "BASIC", "TRANSFER"] = "BASIC"
    bytes_per_second: int = Field(-1, ge=-1)

    def request(self) -> dict[str, Any]:
        return {"VerifyMode": self.verify_mode, "TransferMode": self.transfer_mode,
                "OverwriteMode": self.overwrite_mode,
                "PreserveDeletedFiles": self.preserve_deleted_files,
                "LogLevel": self.log_level, "BytesPerSecond": self.bytes_per_second}


def include_filter(paths: list[str]) -> list[dict[str, str]]:
    """DataSync's filter syntax: one SIMPLE_PATTERN, patterns joined by ``|``."""
    for p in paths:
        if "|" in p:
            raise ValueError(f"include pattern {p!r} contains '|', DataSync's separator")
        if not p.startswith("/"):
            raise ValueError(f"include pattern {p!r} must start with '/' (relative to the "
                             "location's subdirectory)")
    return [{"FilterType": "SIMPLE_PATTERN", "Value": "|".join(paths)}] if paths else []


@dataclass(frozen=True)
class ExecutionProgress:
    arn: str
    status: str
    bytes_transferred: int
    bytes_expected: int
    files_transferred: int
    files_expected: int

    @property
    def line(self) -> str:
        total = f"/{self.bytes_expected}" if self.bytes_expected else ""
        return (f"{self.status}: {self.bytes_transferred}{total} bytes, "
                f"{self.files_transferred} files")


class DataSync:
    """DataSync calls with waiting. ``client`` overrides the client (tests stub it)."""

    def __init__(self, aws: AwsTarget, client: Any = None, poll_seconds: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.ds = client or aws.client("datasync")
        self.poll_seconds = poll_seconds
        self._sleep = sleep

    # ---------------------------------------------------------------- locations
    def s3_location(self, bucket_arn: str, role_arn: str, subdirectory: str = "/",
                    storage_class: str = "STANDARD") -> str:
        return self.ds.create_location_s3(
            S3BucketArn=bucket_arn, Subdirectory=subdirectory, S3StorageClass=storage_class,
            S3Config={"BucketAccessRoleArn": role_arn})["LocationArn"]

    def fsx_lustre_location(self, file_system_arn: str, security_group_arns: list[str],
                            subdirectory: str = "/") -> str:
        return self.ds.create_location_fsx_lustre(
            FsxFilesystemArn=file_system_arn, SecurityGroupArns=security_group_arns,
            Subdirectory=subdirectory)["LocationArn"]

    def nfs_location(self, hostname: str, subdirectory: str, agent_arns: list[str],
                     version: Literal["AUTOMATIC", "NFS3", "NFS4_0", "NFS4_1"] = "AUTOMATIC",
                     ) -> str:
        return self.ds.create_location_nfs(
            ServerHostname=hostname, Subdirectory=subdirectory,
            OnPremConfig={"AgentArns": agent_arns},
            MountOptions={"Version": version})["LocationArn"]

    def efs_location(self, file_system_arn: str, subnet_arn: str, security_group_arns: list[str],
                     subdirectory: str = "/", access_point_arn: str | None = None,
                     role_arn: str | None = None, tls: bool = True) -> str:
        req: dict[str, Any] = {
            "EfsFilesystemArn": file_system_arn, "Subdirectory": subdirectory,
            "Ec2Config": {"SubnetArn": subnet_arn, "SecurityGroupArns": security_group_arns},
            "InTransitEncryption": "TLS1_2" if tls else "NONE"}
        if access_point_arn:
            req["AccessPointArn"] = access_point_arn
        if role_arn:
            req["FileSystemAccessRoleArn"] = role_arn
        return self.ds.create_location_efs(**req)["LocationArn"]

    # ---------------------------------------------------------------- tasks
    def create_task(self, source_arn: str, destination_arn: str, name: str,
                    options: TaskOptions | None = None, includes: list[str] | None = None,
                    excludes: list[str] | None = None, log_group_arn: str | None = None) -> str:
        req: dict[str, Any] = {
            "SourceLocationArn": source_arn, "DestinationLocationArn": destination_arn,
            "Name": name, "Options": (options or TaskOptions()).request()}
        if includes:
            req["Includes"] = include_filter(includes)
        if excludes:
            req["Excludes"] = include_filter(excludes)
        if log_group_arn:
            req["CloudWatchLogGroupArn"] = log_group_arn
        return self.ds.create_task(**req)["TaskArn"]

    def start(self, task_arn: str, includes: list[str] | None = None) -> str:
        req: dict[str, Any] = {"TaskArn": task_arn}
        if includes:
            req["Includes"] = include_filter(includes)
        return self.ds.start_task_execution(**req)["TaskExecutionArn"]

    def wait_execution(self, execution_arn: str, timeout: float = 12 * 3600,
                       on_progress: Callable[[ExecutionProgress], None] | None = None,
                       ) -> ExecutionProgress:
        """Until SUCCESS (returned) or ERROR (raised with DataSync's reason)."""
        deadline = time.monotonic() + timeout
        while True:
            e = self.ds.describe_task_execution(TaskExecutionArn=execution_arn)
            progress = ExecutionProgress(
                execution_arn, e["Status"], e.get("BytesTransferred", 0),
                e.get("EstimatedBytesToTransfer", 0), e.get("FilesTransferred", 0),
                e.get("EstimatedFilesToTransfer", 0))
            if on_progress:
                on_progress(progress)
            if e["Status"] == "SUCCESS":
                return progress
            if e["Status"] == "ERROR":
                raise DataSyncError(_failure(execution_arn, e))
            if time.monotonic() >= deadline:
                raise DataSyncError(f"timed out waiting for {execution_arn} ({progress.line})")
            self._sleep(self.poll_seconds)

    def run(self, task_arn: str, includes: list[str] | None = None,
            **wait: Any) -> ExecutionProgress:
        return self.wait_execution(self.start(task_arn, includes), **wait)


def _failure(arn: str, e: dict[str, Any]) -> str:
    r = e.get("Result") or {}
    phases = ", ".join(f"{p} {r[k]}" for p, k in (("prepare", "PrepareStatus"),
                                                  ("transfer", "TransferStatus"),
                                                  ("verify", "VerifyStatus")) if r.get(k))
    code = r.get("ErrorCode") or "no error code"
    detail = r.get("ErrorDetail") or "no detail given"
    failed = e.get("FilesFailed") or {}
    counts = ", ".join(f"{v} {k.lower()}" for k, v in failed.items() if v) if isinstance(
        failed, dict) else ""
    return (f"DataSync execution {arn} failed: {code}: {detail}"
            + (f" ({phases})" if phases else "")
            + (f"; files failed: {counts}" if counts else "")
            + "; see the task's CloudWatch log group for per-file errors")
