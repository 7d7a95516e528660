"""What is there before anything moves: the source listed once, the destination stat'ed once.

An S3 prefix is listed with ListObjectsV2 (top-level folders in parallel), a local tree is
walked once; every key is checked so an unsafe one refuses the whole transfer before a byte is
written. The destination's side is one ``scandir`` per folder, which is also where a killed
run's ``.cfpart`` files are found and removed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from infra.staging.locations import (
    S3Location,
    StageError,
    check_relative_key,
    client_error,
    destination_error,
    is_directory_marker,
)
from infra.staging.model import Entry

PART_SUFFIX = ".cfpart"


def list_objects(s3: Any, bucket: str, prefix: str, concurrency: int) -> list[dict[str, Any]]:
    """Every object under ``prefix``: one ListObjectsV2 pass, top-level folders in parallel.

    A listing is sequential page by page (each needs the previous continuation token);
    splitting at the first ``/`` lets the folders' pages be fetched and parsed concurrently
    at the cost of one extra request.
    """
    objects: list[dict[str, Any]] = []
    folders: list[str] = []
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix, Delimiter="/")
    for page in pages:
        objects.extend(page.get("Contents", []))
        folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))

    def whole(folder: str) -> list[dict[str, Any]]:
        return [o for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=folder) for o in page.get("Contents", [])]

    if len(folders) == 1:
        objects.extend(whole(folders[0]))
    elif folders:
        with ThreadPoolExecutor(min(concurrency, len(folders))) as pool:
            for chunk in pool.map(whole, folders):
                objects.extend(chunk)
    return objects


def s3_entries(s3: Any, loc: S3Location, check: bool, concurrency: int) -> list[Entry]:
    """The files under an S3 prefix (directory markers dropped); ``check`` refuses unsafe keys."""
    out: list[Entry] = []
    try:
        objects = list_objects(s3, loc.bucket, loc.prefix, concurrency)
    except ClientError as e:
        raise client_error(e, f"listing {loc.uri}") from e
    for obj in objects:
        rel = obj["Key"][len(loc.prefix):]
        if is_directory_marker(rel, obj["Size"]):
            continue
        if check:
            check_relative_key(rel, obj["Key"])
        out.append(Entry(rel, obj["Size"], obj.get("ETag", "")))
    if check:
        refuse_file_dir_clashes(out, loc.uri)
    return out


def refuse_file_dir_clashes(entries: list[Entry], uri: str) -> None:
    files = {e.rel for e in entries}
    for e in entries:
        parts = e.rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise StageError(
                    f"{uri}: {parent!r} is both a file and the folder of {e.rel!r}; a "
                    "filesystem cannot hold both, so nothing was staged")


def walk_local(root: Path) -> list[Entry]:
    if not root.exists():
        raise StageError(f"{root} does not exist")
    if not root.is_dir():
        raise StageError(f"{root} is not a directory (stage a folder, not a file)")
    out: list[Entry] = []

    def walk(folder: Path, prefix: str) -> Iterator[Entry]:
        try:
            it = os.scandir(folder)
        except OSError as e:
            raise StageError(f"cannot read {folder}: {e.strerror or e}") from e
        with it:
            for d in it:
                rel = prefix + d.name
                if d.name.endswith(PART_SUFFIX) and d.name.startswith("."):
                    continue
                if d.is_dir(follow_symlinks=False):
                    yield from walk(Path(d.path), rel + "/")
                    continue
                try:
                    st = d.stat(follow_symlinks=True)
                except OSError:
                    continue  # a dangling symlink
                if not stat.S_ISREG(st.st_mode):
                    continue
                check_relative_key(rel, rel)
                yield Entry(rel, st.st_size, str(st.st_mtime_ns), st.st_mtime_ns)

    out.extend(walk(root, ""))
    return out


def scan_destination(root: Path, rels: set[str]) -> dict[str, Any]:
    """Stat what is already there, one scandir per source folder; clear dead runs' parts."""
    folders: dict[str, set[str]] = {}
    for rel in rels:
        parent, _, name = rel.rpartition("/")
        folders.setdefault(parent, set()).add(name)
    found: dict[str, Any] = {}
    for parent, names in folders.items():
        folder = root / parent if parent else root
        try:
            it = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise destination_error(e, folder) from e
        with it:
            for d in it:
                if d.name.endswith(PART_SUFFIX) and d.name.startswith("."):
                    remove_dead_part(Path(d.path))
                    continue
                if d.name not in names:
                    continue
                rel = f"{parent}/{d.name}" if parent else d.name
                if d.is_dir(follow_symlinks=False):
                    found[rel] = "dir"
                    continue
                try:
                    st = d.stat(follow_symlinks=False)
                except OSError:
                    continue
                found[rel] = (st.st_size, st.st_mtime_ns)
    return found


def remove_dead_part(path: Path) -> None:
    """A ``.name.<pid>.<rand>.cfpart`` whose writer is gone is garbage; a live one is not ours."""
    try:
        pid = int(path.name[: -len(PART_SUFFIX)].rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
            return  # still running: another stager is writing here
        except ProcessLookupError:
            pass
        except PermissionError:
            return
    with contextlib.suppress(OSError):
        path.unlink()
