"""A run's data through FSx for Lustre: inputs in through the file system's S3 link, results
out through an export task, verified in S3 before anyone is told they are there.

ParallelCluster creates the file system from the cluster config (``SharedStorage`` with
``FsxLustreSettings``), so the links are read from that config:

- PERSISTENT_2 with data repository associations (DRAs): an input object reaches the file
  system either by auto-import (the DRA's ``AutoImportPolicy`` has ``NEW``), for which this
  waits until the files are visible, or by an ``IMPORT_METADATA_FROM_REPOSITORY`` task on
  exactly the run's paths. Contents load lazily on first read either way.
- SCRATCH_2 with ``ImportPath``: objects present when the file system was created are listed
  and load lazily on first read; later ones need the file system's auto-import, so this
  waits for them to become visible, as for a DRA with auto-import.
- Results leave through an ``EXPORT_TO_REPOSITORY`` task on the run's output directory (even
  with ``AutoExportPolicy``, which has no completion signal); a task that fails, or exports
  only part of the files, raises with the failure report's rows. Then every output is read
  back from S3 and its sha256 compared with the manifest's, so the manifest (the "results
  ready" event) is only published for bytes that are really in S3.

Visibility is asked of a callable (the cluster's shell: ``test -e`` on the head node), since
only machines that mount the file system can see it; the flow itself need not.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infra.staging.fsx import Fsx, FsxError, TaskResult, TaskType
from infra.staging.fsx_tasks import MAX_PATHS, TaskQueue

Visible = Callable[[list[str]], list[str]]  # mounted paths -> those that exist


@dataclass(frozen=True)
class FsxLink:
    """One S3 link of the file system: a DRA, or a SCRATCH file system's import path."""

    mount_dir: str  # /fsx
    file_system_path: str  # /inputs ("/" for a scratch import path)
    repository: str  # s3://bucket/prefix/ (always ending in /)
    auto_import: tuple[str, ...] = ()
    auto_export: tuple[str, ...] = ()
    lazy: bool = False  # SCRATCH ImportPath: no DRA, no import task
    export_only: bool = False  # SCRATCH ExportPath: where export tasks write

    def _split(self) -> tuple[str, str]:
        bucket, _, prefix = self.repository[len("s3://"):].partition("/")
        return bucket, prefix

    def fs_path(self, bucket: str, key: str) -> str | None:
        """The file-system path of ``s3://bucket/key``, or None if this link does not hold it."""
        b, prefix = self._split()
        if b != bucket or not key.startswith(prefix):
            return None
        rel = key[len(prefix):]
        return f"{self.file_system_path.rstrip('/')}/{rel}"

    def s3_key(self, fs_path: str) -> tuple[str, str] | None:
        """(bucket, key) that ``fs_path`` (file-system relative) exports to, or None."""
        root = self.file_system_path.rstrip("/")
        if root and not fs_path.startswith(root + "/"):
            return None
        bucket, prefix = self._split()
        return bucket, prefix + fs_path[len(root):].lstrip("/")

    def mounted(self, fs_path: str) -> str:
        return self.mount_dir.rstrip("/") + fs_path


def _repo(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def links_from_config(raw: Mapping[str, Any]) -> list[FsxLink]:
    """Every S3 link of the first FSx for Lustre in a ParallelCluster config."""
    for st in raw.get("SharedStorage", []):
        if st.get("StorageType") != "FsxLustre":
            continue
        fsx = st.get("FsxLustreSettings", {})
        mount = st["MountDir"]
        links = [FsxLink(mount, d["FileSystemPath"], _repo(d["DataRepositoryPath"]),
                         tuple(d.get("AutoImportPolicy", [])),
                         tuple(d.get("AutoExportPolicy", [])))
                 for d in fsx.get("DataRepositoryAssociations", [])]
        if fsx.get("ImportPath"):
            auto = fsx.get("AutoImportPolicy")
            links.append(FsxLink(mount, "/", _repo(fsx["ImportPath"]),
                                 ("NEW", "CHANGED") if auto in ("NEW", "NEW_CHANGED",
                                                                "NEW_CHANGED_DELETED") else (),
                                 lazy=True))
        if fsx.get("ExportPath"):
            links.append(FsxLink(mount, "/", _repo(fsx["ExportPath"]), export_only=True))
        return links
    return []


class VerifyError(RuntimeError):
    """An exported result is missing from S3 or its bytes are not the manifest's."""


def _link_for(links: Sequence[FsxLink], bucket: str, key: str) -> tuple[FsxLink, str]:
    for link in links:
        if link.export_only:
            continue
        path = link.fs_path(bucket, key)
        if path is not None:
            return link, path
    raise FsxError(f"s3://{bucket}/{key} is under none of the file system's links ("
                   + ", ".join(ln.repository for ln in links) + "): add a data repository "
                   "association for it to the cluster config")


class FsxRunStaging:
    """Stage a run's inputs in and its results out of one FSx for Lustre file system."""

    def __init__(self, fsx: Fsx, file_system_id: str, links: Sequence[FsxLink], *,
                 visible: Visible | None = None, report_path: str | None = None,
                 visible_timeout: float = 600, poll_seconds: float = 5.0,
                 sleep: Callable[[float], None] = time.sleep,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        self.fsx, self.fs_id, self.links = fsx, file_system_id, list(links)
        self.visible, self.report_path = visible, report_path
        self.visible_timeout, self.poll_seconds = visible_timeout, poll_seconds
        self._sleep, self.progress = sleep, progress
        # One task at a time on the file system; concurrent requests batched (fsx_tasks).
        self.tasks = TaskQueue(self._task)

    def _task(self, kind: TaskType, paths: list[str]) -> TaskResult:
        if kind == "EXPORT_TO_REPOSITORY":
            return self.fsx.export(self.fs_id, paths, self.report_path)
        return self.fsx.import_metadata(self.fs_id, paths, self.report_path)

    def stage_in(self, bucket: str, keys: Sequence[str]) -> list[str]:
        """Make ``s3://bucket/key`` visible on the file system; returns the mounted paths."""
        targets = [_link_for(self.links, bucket, k) for k in keys]
        by_task = list(dict.fromkeys(p for link, p in targets
                                     if not (link.lazy or "NEW" in link.auto_import)))
        waits = [link.mounted(p) for link, p in targets if link.lazy or "NEW" in
                 link.auto_import]
        for i in range(0, len(by_task), MAX_PATHS):
            result = self.tasks.submit("IMPORT_METADATA_FROM_REPOSITORY",
                                       by_task[i:i + MAX_PATHS])
            self.progress(f"imported {result.succeeded} file(s) with task {result.task_id}")
        if waits:
            self._wait_visible(waits)
        return [link.mounted(p) for link, p in targets]

    def _wait_visible(self, paths: list[str]) -> None:
        if self.visible is None:
            raise FsxError("the inputs arrive by auto-import, which has no completion signal, "
                           "and nothing can look at the file system; give a visibility check")
        deadline = time.monotonic() + self.visible_timeout
        while True:
            missing = sorted(set(paths) - set(self.visible(paths)))
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise FsxError(f"auto-import did not make {len(missing)} file(s) visible in "
                               f"{self.visible_timeout:.0f} s: {', '.join(missing[:5])} (is "
                               "the link's AutoImportPolicy NEW, and the object in S3?)")
            self._sleep(self.poll_seconds)

    def stage_out(self, aws: Any, out_dir: str, files: Sequence[Mapping[str, Any]],
                  ) -> TaskResult:
        """Export ``out_dir`` (file-system path) and verify each manifest file in S3.

        ``files``: the manifest's entries (``name``, ``sha256``), relative to ``out_dir``.
        """
        result = self.export(out_dir)
        self.verify(aws, out_dir, files, result.task_id)
        return result

    def export(self, out_dir: str) -> TaskResult:
        """EXPORT_TO_REPOSITORY scoped to ``out_dir``; a failure names the report and paths."""
        result = self.tasks.submit("EXPORT_TO_REPOSITORY", [out_dir])
        self.progress(f"exported {result.succeeded} file(s) from {out_dir} with task "
                      f"{result.task_id}")
        return result

    def read_exported(self, aws: Any, fs_path: str) -> bytes:
        """The bytes an export put in S3 for ``fs_path`` (a missing object is VerifyError)."""
        bucket, key = self._s3_of(fs_path)
        s3 = aws.client("s3")
        try:
            return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            raise VerifyError(f"s3://{bucket}/{key} is missing after the export") from None

    def verify(self, aws: Any, out_dir: str, files: Sequence[Mapping[str, Any]],
               task_id: str) -> list[tuple[str, str]]:
        """Each file's sha256 in S3 against ``files``; returns their (bucket, key)."""
        s3 = aws.client("s3")
        problems, where_all = [], []
        for f in files:
            where = self._s3_of(f"{out_dir.rstrip('/')}/{f['name']}")
            where_all.append(where)
            try:
                body = s3.get_object(Bucket=where[0], Key=where[1])["Body"]
            except s3.exceptions.NoSuchKey:
                problems.append(f"s3://{where[0]}/{where[1]} is missing")
                continue
            digest = hashlib.sha256()
            for chunk in iter(lambda b=body: b.read(1 << 20), b""):
                digest.update(chunk)
            if digest.hexdigest() != f["sha256"]:
                problems.append(f"s3://{where[0]}/{where[1]} has sha256 {digest.hexdigest()}, "
                                f"not the manifest's {f['sha256']}")
        if problems:
            raise VerifyError(f"export task {task_id} succeeded but "
                              f"{len(problems)} result(s) do not match: " + "; ".join(problems))
        return where_all

    def _s3_of(self, fs_path: str) -> tuple[str, str]:
        # An export path (SCRATCH) wins over the import path it usually sits beside.
        for link in sorted(self.links, key=lambda ln: not ln.export_only):
            if link.lazy:
                continue
            got = link.s3_key(fs_path)
            if got is not None:
                return got
        raise FsxError(f"{fs_path} is under no data repository association, so it cannot be "
                       "exported: write results under a DRA's FileSystemPath")
