"""Where a run's data lies on a cluster's FSx for Lustre and where it goes in S3.

Decided from the ParallelCluster config alone (no AWS call), so a spec that cannot stage
through the file system is refused when it is loaded, before anything is created:

- the input object must be under one of the file system's S3 links (a data repository
  association, or a SCRATCH file system's ``ImportPath``);
- results go to the file-system path of the association that exports to the run's results
  prefix, so the export task writes them exactly where the run publishes them. Without such
  an association, a SCRATCH file system's ``ExportPath`` takes them, and the flow copies them
  (server side, verified) from there to the results prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infra.staging.fsx_run import FsxLink, links_from_config


@dataclass(frozen=True)
class FsxLayout:
    """The FSx for Lustre of a cluster config as seen by one spec."""

    storage_name: str
    mount_dir: str
    file_system_id: str | None  # an existing file system the config mounts; else None
    links: tuple[FsxLink, ...]

    def input_link(self, bucket: str, key: str) -> FsxLink | None:
        for link in self.links:
            if not link.export_only and link.fs_path(bucket, key) is not None:
                return link
        return None

    def results_dir(self, bucket: str, prefix: str, remote_root: str) -> tuple[str, bool]:
        """(file-system path to write and export the results to, copy needed afterwards?).

        ``prefix`` is the run's own results prefix (``runs/<run id>/``).
        """
        for link in self.links:
            if link.lazy or link.export_only:
                continue
            path = link.fs_path(bucket, prefix)
            if path is not None:
                return path.rstrip("/"), False
        for link in self.links:
            if link.export_only:
                root = remote_root.removeprefix(self.mount_dir.rstrip("/")) or "/"
                return f"{root.rstrip('/')}/export/{prefix.strip('/')}", True
        raise LookupError(f"s3://{bucket}/{prefix}")

    def mounted(self, fs_path: str) -> str:
        return self.mount_dir.rstrip("/") + fs_path


def fsx_layout(raw: Mapping[str, Any]) -> FsxLayout | None:
    """The config's first FSx for Lustre with an S3 link, or None."""
    for st in raw.get("SharedStorage", []) or []:
        if st.get("StorageType") != "FsxLustre":
            continue
        links = links_from_config({"SharedStorage": [st]})
        if links:
            return FsxLayout(st.get("Name", ""), st["MountDir"],
                             (st.get("FsxLustreSettings") or {}).get("FileSystemId"),
                             tuple(links))
    return None


def staging_problem(raw: Mapping[str, Any], *, input_bucket: str, input_keys: Sequence[str],
                    results_bucket: str, results_prefix: str, remote_root: str) -> str | None:
    """Why this config cannot stage this spec's data through FSx (None: it can)."""
    layout = fsx_layout(raw)
    if layout is None:
        existing = any((st.get("FsxLustreSettings") or {}).get("FileSystemId")
                       for st in raw.get("SharedStorage", []) or [])
        if existing:  # its associations live outside the config, unknown offline
            return ("its FSx for Lustre is an existing file system (FileSystemId), whose S3 "
                    "links clusterflow cannot see in the config yet")
        return ("the cluster config has no FSx for Lustre storage linked to S3 (a "
                "DataRepositoryAssociation, or ImportPath/ExportPath)")
    for key in input_keys:
        if layout.input_link(input_bucket, key) is None:
            repos = ", ".join(ln.repository for ln in layout.links if not ln.export_only)
            return (f"the input s3://{input_bucket}/{key} is under none of its FSx links "
                    f"({repos}): add a DataRepositoryAssociation for it")
    try:
        layout.results_dir(results_bucket, results_prefix + "run/", remote_root)
    except LookupError:
        return (f"no FSx link exports to s3://{results_bucket}/{results_prefix}: add a "
                "DataRepositoryAssociation for it (or an ExportPath on a SCRATCH file system)")
    if not remote_root.startswith(layout.mount_dir.rstrip("/") + "/"):
        return (f"parallelcluster.remote_root ({remote_root}) is not under the FSx mount "
                f"{layout.mount_dir}")
    return None
