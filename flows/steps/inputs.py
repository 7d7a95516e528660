"""A step's inputs: where they come from, what their bytes are, and the path a command sees.

Identities (sha256 of every byte a step reads) are known *before* a step runs: S3 keeps a
SHA-256 for every object clusterflow accepts, upstream steps report theirs, local files are
hashed once. That is what lets ``reuse_result`` decide without running anything.
Upstream outputs are handed over on the shared scratch as symlinks, never through S3.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
from pathlib import Path, PurePath
from typing import Any

from flows.steps.graph import InputRef
from infra.aws.clients import AwsTarget
from infra.staging.locations import StageError
from infra.staging.objects import _b64_to_hex, download, sha256_file


class InputError(RuntimeError):
    """An input that cannot be provided (missing object, no checksum, no matching output)."""


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def s3_identity(aws: AwsTarget, uri: str) -> Any:
    """The SHA-256(s) S3 holds for an object or every object under a prefix."""
    bucket, key = split_s3(uri)
    s3 = aws.client("s3")
    if key and not key.endswith("/"):
        return _object_sha(s3, bucket, key, uri)
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            found.append([obj["Key"][len(key):], _object_sha(s3, bucket, obj["Key"], uri)])
    if not found:
        raise InputError(f"{uri} holds no objects")
    return sorted(found)


def _object_sha(s3: Any, bucket: str, key: str, uri: str) -> str:
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as e:
        raise InputError(f"s3://{bucket}/{key} cannot be read "
                         f"({e.response['Error'].get('Code', e)}); input {uri}") from None
    stored = head.get("ChecksumSHA256")
    if stored and "-" not in stored:
        return _b64_to_hex(stored)
    meta = head.get("Metadata", {}).get("sha256")
    if not meta:
        raise InputError(f"s3://{bucket}/{key} carries no SHA-256; upload it with "
                         "`clusterflow stage` so what the ranks read can be proven")
    return meta


_local_cache: dict[tuple[str, float, int], str] = {}
_local_lock = threading.Lock()


def local_identity(path: Path) -> Any:
    """sha256 of a file, or [relative path, sha256] of every file below a directory."""
    if path.is_file():
        st = path.stat()
        k = (str(path), st.st_mtime, st.st_size)
        with _local_lock:
            if k not in _local_cache:
                _local_cache[k] = sha256_file(path)
            return _local_cache[k]
    return sorted([str(p.relative_to(path)), local_identity(p)]
                  for p in path.rglob("*") if p.is_file())


def matching(files: list[dict[str, Any]], glob: str | None) -> list[dict[str, Any]]:
    if glob is None:
        return files
    return [f for f in files if fnmatch.fnmatchcase(f["name"], glob)]


def upstream_identity(ref: InputRef, records: list[dict[str, Any]]) -> Any:
    return [[r["label"], [[f["name"], f["sha256"]] for f in matching(r["files"], ref.glob)]]
            for r in records]


def digest(identity: Any) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def upstream_links(ref: InputRef, records: list[dict[str, Any]], dest: PurePath,
                   fan_in: bool) -> tuple[PurePath, list[tuple[PurePath, PurePath]]]:
    """The path a command gets for the upstream outputs ``ref`` names, and the links
    (link, target) that make them visible under ``dest``: the file itself for a plain path
    from one point (no links), else a directory (one sub-directory per point for a fan-in).
    Pure, so the links can be made where the files are (on this machine's scratch, or by the
    job on the cluster's file system)."""
    kind = type(dest)
    if ref.is_file and not fan_in:
        (record,) = records
        chosen = matching(record["files"], ref.glob)
        if not chosen:
            raise InputError(f"step {ref.value!r} wrote no {ref.glob!r}")
        return kind(record["out_dir"]) / chosen[0]["name"], []
    links = []
    for record in records:
        base = dest / record["label"] if fan_in else dest
        chosen = matching(record["files"], ref.glob)
        if not chosen:
            raise InputError(f"step {ref.value!r}"
                             f"{'[' + record['label'] + ']' if record['label'] else ''} "
                             f"wrote no output matching {ref.glob!r}")
        links += [(base / f["name"], kind(record["out_dir"]) / f["name"]) for f in chosen]
    return dest, links


def link_upstream(ref: InputRef, records: list[dict[str, Any]], dest: Path,
                  fan_in: bool) -> Path:
    """:func:`upstream_links` made on this machine's scratch; returns the command's path."""
    path, links = upstream_links(ref, records, dest, fan_in)
    if links or not ref.is_file or fan_in:
        dest.mkdir(parents=True, exist_ok=True)
    for link, target in links:
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(target)
    return Path(path)


def stage_s3(aws: AwsTarget, uri: str, dest: Path) -> Path:
    """An S3 object (or prefix) on scratch, every byte verified against its SHA-256."""
    bucket, key = split_s3(uri)
    try:
        if key and not key.endswith("/"):
            return download(aws, bucket, key, dest / Path(key).name).path
        from infra.staging.model import StageOptions
        from infra.staging.stager import Stager

        Stager(aws, StageOptions()).stage(uri, str(dest))
        return dest
    except StageError as e:  # integrity, a missing prefix, an unsafe key: one line
        raise InputError(str(e)) from None
