"""FSx for Lustre as a staging tier: PERSISTENT_2 file systems linked to S3, and bulk tasks.

A PERSISTENT_2 file system imports nothing from S3 on its own: it needs a *data repository
association* (DRA) linking a file-system path to an S3 prefix, created with
``BatchImportMetaDataOnCreate`` so the existing objects appear as files, and auto-import /
auto-export policies so later changes flow both ways. Bulk moves are *data repository tasks*
(``IMPORT_METADATA_FROM_REPOSITORY``, ``EXPORT_TO_REPOSITORY``), which run for minutes and can
succeed "partly": a task may end SUCCEEDED or FAILED with files that failed, listed only in a
CSV completion report in S3. :meth:`Fsx.wait_task` surfaces all of it: progress while it runs,
and on failure the failure details and the first rows of that report.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from infra.aws.clients import AwsTarget

Event = Literal["NEW", "CHANGED", "DELETED"]
TaskType = Literal["EXPORT_TO_REPOSITORY", "IMPORT_METADATA_FROM_REPOSITORY",
                   "RELEASE_DATA_FROM_FILESYSTEM"]
REPORT_FORMAT = "REPORT_CSV_20191124"


class FsxError(RuntimeError):
    """An FSx resource or task failed; the message carries FSx's own reason."""


class LustreFileSystemSpec(BaseModel):
    """A PERSISTENT_2 Lustre file system (the deployment type that supports DRAs)."""

    model_config = {"extra": "forbid"}

    subnet_id: str
    security_group_ids: list[str] = Field(default_factory=list)
    storage_capacity_gib: int = 1200
    per_unit_storage_throughput: Literal[125, 250, 500, 1000] = 250
    data_compression: Literal["NONE", "LZ4"] = "LZ4"
    file_system_type_version: str = "2.15"
    efa_enabled: bool = False
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("storage_capacity_gib")
    @classmethod
    def _capacity(cls, v: int) -> int:
        if v != 1200 and v % 2400:
            raise ValueError("PERSISTENT_2 capacity is 1200 GiB or a multiple of 2400 GiB")
        return v

    def request(self, token: str) -> dict[str, Any]:
        lustre: dict[str, Any] = {
            "DeploymentType": "PERSISTENT_2",
            "PerUnitStorageThroughput": self.per_unit_storage_throughput,
            "DataCompressionType": self.data_compression,
        }
        if self.efa_enabled:
            lustre["EfaEnabled"] = True
            lustre["MetadataConfiguration"] = {"Mode": "AUTOMATIC"}
        return {
            "ClientRequestToken": token,
            "FileSystemType": "LUSTRE",
            "FileSystemTypeVersion": self.file_system_type_version,
            "StorageCapacity": self.storage_capacity_gib,
            "StorageType": "SSD",
            "SubnetIds": [self.subnet_id],
            "SecurityGroupIds": self.security_group_ids,
            "LustreConfiguration": lustre,
            "Tags": [{"Key": k, "Value": v} for k, v in self.tags.items()],
        }


class RepositoryLinkSpec(BaseModel):
    """A data repository association: ``file_system_path`` <-> ``data_repository_path``."""

    model_config = {"extra": "forbid"}

    file_system_path: str = "/"
    data_repository_path: str
    batch_import_metadata_on_create: bool = True
    imported_file_chunk_size_mib: int | None = Field(None, ge=1, le=512_000)
    auto_import: list[Event] = Field(default_factory=lambda: ["NEW", "CHANGED", "DELETED"])
    auto_export: list[Event] = Field(default_factory=lambda: ["NEW", "CHANGED", "DELETED"])

    @model_validator(mode="after")
    def _paths(self) -> RepositoryLinkSpec:
        if not self.file_system_path.startswith("/"):
            raise ValueError("file_system_path must be absolute, e.g. /inputs")
        if not self.data_repository_path.startswith("s3://"):
            raise ValueError("data_repository_path must be an s3:// URI")
        return self

    def request(self, file_system_id: str, token: str) -> dict[str, Any]:
        s3: dict[str, Any] = {}
        if self.auto_import:
            s3["AutoImportPolicy"] = {"Events": list(self.auto_import)}
        if self.auto_export:
            s3["AutoExportPolicy"] = {"Events": list(self.auto_export)}
        req: dict[str, Any] = {
            "FileSystemId": file_system_id,
            "FileSystemPath": self.file_system_path,
            "DataRepositoryPath": self.data_repository_path,
            "BatchImportMetaDataOnCreate": self.batch_import_metadata_on_create,
            "ClientRequestToken": token,
        }
        if s3:
            req["S3"] = s3
        if self.imported_file_chunk_size_mib:
            req["ImportedFileChunkSize"] = self.imported_file_chunk_size_mib
        return req


@dataclass(frozen=True)
class TaskProgress:
    task_id: str
    lifecycle: str
    total: int
    succeeded: int
    failed: int

    @property
    def line(self) -> str:
        return (f"{self.task_id} {self.lifecycle}: {self.succeeded}/{self.total or '?'} files, "
                f"{self.failed} failed")


@dataclass(frozen=True)
class TaskResult:
    task_id: str
    lifecycle: str
    total: int
    succeeded: int
    failed: int
    report_uri: str | None
    failed_files: list[dict[str, str]]


def _token() -> str:
    return uuid.uuid4().hex


class Fsx:
    """FSx for Lustre calls with waiting. ``client`` overrides the FSx client (tests stub it)."""

    def __init__(self, aws: AwsTarget, client: Any = None, poll_seconds: float = 15.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.aws = aws
        self.fsx = client or aws.client("fsx")
        self.poll_seconds = poll_seconds
        self._sleep = sleep

    # ---------------------------------------------------------------- file systems
    def create_file_system(self, spec: LustreFileSystemSpec, token: str | None = None,
                           ) -> dict[str, Any]:
        """Create (idempotently for a given ``token``) a PERSISTENT_2 Lustre file system."""
        return self.fsx.create_file_system(**spec.request(token or _token()))["FileSystem"]

    def wait_file_system(self, file_system_id: str, timeout: float = 3600) -> dict[str, Any]:
        """Until AVAILABLE; FAILED/MISCONFIGURED raise with FSx's reason."""
        deadline = time.monotonic() + timeout
        while True:
            fs = self.fsx.describe_file_systems(FileSystemIds=[file_system_id])["FileSystems"][0]
            state = fs.get("Lifecycle", "AVAILABLE")
            if state == "AVAILABLE":
                return fs
            if state in ("FAILED", "MISCONFIGURED", "MISCONFIGURED_UNAVAILABLE", "DELETING"):
                reason = fs.get("FailureDetails", {}).get("Message", "no reason given")
                raise FsxError(f"file system {file_system_id} is {state}: {reason}")
            self._wait(deadline, f"file system {file_system_id} to become AVAILABLE ({state})")

    # ---------------------------------------------------------------- associations
    def link_repository(self, file_system_id: str, spec: RepositoryLinkSpec,
                        token: str | None = None) -> dict[str, Any]:
        """Create a data repository association and return it (CREATING at first)."""
        req = spec.request(file_system_id, token or _token())
        return self.fsx.create_data_repository_association(**req)["Association"]

    def wait_association(self, association_id: str, timeout: float = 3600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            a = self.fsx.describe_data_repository_associations(
                AssociationIds=[association_id])["Associations"][0]
            state = a["Lifecycle"]
            if state == "AVAILABLE":
                return a
            if state in ("FAILED", "MISCONFIGURED", "DELETING"):
                reason = a.get("FailureDetails", {}).get("Message", "no reason given")
                hint = (" (check the bucket policy lets FSx read/write the prefix, and that the"
                        " prefix does not overlap another association)"
                        if state == "MISCONFIGURED" else "")
                raise FsxError(f"data repository association {association_id} "
                               f"({a.get('FileSystemPath')} <-> {a.get('DataRepositoryPath')}) "
                               f"is {state}: {reason}{hint}")
            self._wait(deadline, f"association {association_id} to become AVAILABLE ({state})")

    # ---------------------------------------------------------------- tasks
    def start_task(self, file_system_id: str, task_type: TaskType,
                   paths: list[str] | None = None, report_path: str | None = None,
                   token: str | None = None, busy_timeout: float = 6 * 3600) -> str:
        """Start a data repository task; ``report_path`` (s3://...) enables the failure report.

        While another task runs on the file system, waits up to ``busy_timeout`` to start."""
        report: dict[str, Any] = {"Enabled": False}
        if report_path:
            report = {"Enabled": True, "Path": report_path.rstrip("/"),
                      "Format": REPORT_FORMAT, "Scope": "FAILED_FILES_ONLY"}
        req: dict[str, Any] = {"Type": task_type, "FileSystemId": file_system_id,
                               "Report": report, "ClientRequestToken": token or _token()}
        if paths:
            req["Paths"] = paths
        # FSx runs one task per file system at a time and refuses another meanwhile (another
        # run's, on a shared cluster): wait for it, with the same token (idempotent).
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                return self.fsx.create_data_repository_task(**req)["DataRepositoryTask"][
                    "TaskId"]
            except self.fsx.exceptions.DataRepositoryTaskExecuting:
                self._wait(deadline, f"another data repository task on {file_system_id} to "
                                     f"end before the {task_type} task can start")

    def export(self, file_system_id: str, paths: list[str] | None = None,
               report_path: str | None = None, **wait: Any) -> TaskResult:
        """EXPORT_TO_REPOSITORY and wait: results written on Lustre reach S3."""
        task_id = self.start_task(file_system_id, "EXPORT_TO_REPOSITORY", paths, report_path)
        return self.wait_task(task_id, **wait)

    def import_metadata(self, file_system_id: str, paths: list[str] | None = None,
                        report_path: str | None = None, **wait: Any) -> TaskResult:
        """IMPORT_METADATA_FROM_REPOSITORY and wait: new S3 objects appear as files."""
        task_id = self.start_task(file_system_id, "IMPORT_METADATA_FROM_REPOSITORY", paths,
                                  report_path)
        return self.wait_task(task_id, **wait)

    def wait_task(self, task_id: str, timeout: float = 6 * 3600,
                  on_progress: Callable[[TaskProgress], None] | None = None,
                  allow_failed_files: bool = False) -> TaskResult:
        """Until the task ends. FAILED, CANCELED, or any failed file raise :class:`FsxError`."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.fsx.describe_data_repository_tasks(TaskIds=[task_id])[
                "DataRepositoryTasks"][0]
            status = t.get("Status", {})
            progress = TaskProgress(task_id, t["Lifecycle"], status.get("TotalCount", 0),
                                    status.get("SucceededCount", 0),
                                    status.get("FailedCount", 0))
            if on_progress:
                on_progress(progress)
            if t["Lifecycle"] in ("SUCCEEDED", "FAILED", "CANCELED"):
                break
            self._wait(deadline, f"data repository task {progress.line}")
        report = t.get("Report") or {}
        report_uri = report.get("Path") if report.get("Enabled") else None
        failed_files = self._failure_report(report_uri, task_id) if (
            progress.failed or t["Lifecycle"] == "FAILED") and report_uri else []
        result = TaskResult(task_id, t["Lifecycle"], progress.total, progress.succeeded,
                            progress.failed, report_uri, failed_files)
        if t["Lifecycle"] != "SUCCEEDED" or (progress.failed and not allow_failed_files):
            reason = t.get("FailureDetails", {}).get("Message", "")
            rows = "; ".join(f"{r.get('path', '?')}: {r.get('error', '?')}"
                             for r in failed_files[:10])
            raise FsxError(
                f"{t.get('Type', 'data repository task')} {task_id} ended {t['Lifecycle']}: "
                f"{progress.failed} of {progress.total} files failed"
                + (f"; {reason}" if reason else "")
                + (f"; first failures: {rows}" if rows else "")
                + (f"; full report under {report_uri}" if report_uri else
                   "; enable a report (report_path) to see which files failed"))
        return result

    def _failure_report(self, report_uri: str, task_id: str) -> list[dict[str, str]]:
        """Rows of ``{path}/task-{id}/failures.csv`` (FilePath, FileStatus, ErrorCode)."""
        bucket, _, prefix = report_uri[len("s3://"):].partition("/")
        s3 = self.aws.client("s3")
        short = task_id.removeprefix("task-")
        try:  # every page: the report path collects every task's reports over time
            pages = s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix.rstrip("/") + "/")
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])
                    if short in o["Key"] and o["Key"].endswith(".csv")]
        except Exception:  # noqa: BLE001 - the report is a bonus; the task status is the error
            return []
        rows: list[dict[str, str]] = []
        for key in keys:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode(errors="replace")
            for rec in csv.reader(io.StringIO(body)):
                if not rec or rec[0].lower() == "filepath":
                    continue
                rows.append({"path": rec[0], "status": rec[1] if len(rec) > 1 else "",
                             "error": rec[2] if len(rec) > 2 else ""})
        return rows

    def _wait(self, deadline: float, what: str) -> None:
        if time.monotonic() >= deadline:
            raise FsxError(f"timed out waiting for {what}")
        self._sleep(self.poll_seconds)
