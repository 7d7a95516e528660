"""What is there before anything moves: the source listed once, the destination stat'ed once.

An S3 prefix is listed with ListObjectsV2 (top-level folders in parallel), a local tree is
walked once; every key is checked so an unsafe one refuses the whole transfer before a byte is
written. The destination's side is one ``scandir`` per folder, which is also where a killed
run's ``.cfpart`` files are found and removed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from infra.staging.locations import (
    OutsideLinkError,
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


def walk_local(root: Path, follow_links: bool = False,
               skipped: list[dict[str, str]] | None = None) -> list[Entry]:
    """The regular files under ``root``; everything else is left out and reported.

    A symlink to a file inside the tree is staged as that file. A symlink that resolves outside
    the tree refuses the whole transfer unless ``follow_links`` (a link to ``/etc/passwd``
    would otherwise upload it), naming every such link. Links to directories (followed, with
    loops cut, only with ``follow_links``), dangling links, and sockets, FIFOs and devices are
    appended to ``skipped`` as ``{"path", "reason"}``, so a report can say what was not staged.
    """
    if not root.exists():
        raise StageError(f"{root} does not exist")
    if not root.is_dir():
        raise StageError(f"{root} is not a directory (stage a folder, not a file)")
    real_root = os.path.realpath(root)
    left_out = skipped if skipped is not None else []
    outside: list[str] = []

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
                if d.is_symlink():
                    yield from link(d, rel, folder)
                    continue
                if d.is_dir(follow_symlinks=False):
                    yield from walk(Path(d.path), rel + "/")
                    continue
                try:
                    st = d.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted since it was listed: not part of the tree any more
                if not stat.S_ISREG(st.st_mode):
                    left_out.append({"path": rel, "reason": f"not a regular file "
                                     f"({_kind(st.st_mode)})"})
                    continue
                check_relative_key(rel, rel)
                yield Entry(rel, st.st_size, str(st.st_mtime_ns), st.st_mtime_ns)

    def link(d: os.DirEntry[str], rel: str, folder: Path) -> Iterator[Entry]:
        target = os.readlink(d.path)
        real = os.path.realpath(d.path)
        try:
            st = os.stat(d.path)
        except OSError:
            left_out.append({"path": rel, "reason": f"dangling symlink (-> {target})"})
            return
        if not _within(real, real_root) and not follow_links:
            outside.append(f"{rel!r} -> {target}")
            return
        if stat.S_ISDIR(st.st_mode):
            if not follow_links:
                left_out.append({"path": rel, "reason": f"symlink to a directory (-> {target}); "
                                 "pass --follow-links to stage what it holds"})
            elif _within(os.path.realpath(folder), real):  # it leads back up: a loop
                left_out.append({"path": rel, "reason": f"symlink loop (-> {target})"})
            else:
                yield from walk(Path(d.path), rel + "/")
            return
        if not stat.S_ISREG(st.st_mode):
            left_out.append({"path": rel, "reason": f"symlink to a {_kind(st.st_mode)} "
                             f"(-> {target})"})
            return
        check_relative_key(rel, rel)
        yield Entry(rel, st.st_size, str(st.st_mtime_ns), st.st_mtime_ns)

    out = list(walk(root, ""))
    if outside:
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        raise OutsideLinkError(
            f"refusing to stage {root}: {len(outside)} symlink(s) point outside it "
            f"({', '.join(outside[:5])}{more}); nothing was staged. Remove them, or pass "
            "--follow-links to upload what they point to")
    return out


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def scan_destination(root: Path, rels: set[str], removed: list[Path] | None = None,
                     ) -> dict[str, Any]:
    """Stat what is already there, one scandir per source folder; clear dead runs' parts
    (appended to ``removed``)."""
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
                    if remove_dead_part(Path(d.path)) and removed is not None:
                        removed.append(Path(d.path))
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


def remove_dead_part(path: Path) -> bool:
    """A ``.name.<pid>.<rand>.cfpart`` whose writer is gone is garbage; a live one is not ours.

    True when ``path`` was removed.
    """
    try:
        pid = int(path.name[: -len(PART_SUFFIX)].rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
            return False  # still running: another stager is writing here
        except ProcessLookupError:
            pass
        except PermissionError:
            return False
    try:
        path.unlink()
    except OSError:
        return False
    return True
