"""Checksummed, crash-safe outputs for MPI kernels.

Downstream steps (publishing, fan-out) trust ``manifest.json`` to describe exactly the bytes
on disk, so every output is written to a temporary file in the destination directory, fsynced
and renamed into place: a reader sees either the old file or the complete new one, never a
torn write, even if the job is killed mid-write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

_CHUNK = 1 << 20  # 1 MiB: keeps memory flat for multi-GB fields while amortising syscalls.


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, streamed so huge outputs never have to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry itself reaches disk. Not every
    # platform/filesystem lets you fsync a directory; the data file is already synced, so a
    # failure here only weakens durability, not atomicity.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write` on a temp file next to `path`, fsync it and rename it onto `path`."""
    # The temp file lives in the destination directory so os.replace is a same-filesystem
    # rename (atomic) rather than a copy.
    # os.open with 0o666 (not mkstemp's 0o600) so the final file gets the usual umask-derived
    # permissions and stays readable by whoever consumes the outputs.
    path = Path(path)
    tmp_name = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


_atomic_write = atomic_write


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically (see `atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Save `array` as ``.npy`` at exactly `path`, atomically.

    Pickling is disabled so the file can always be memory-mapped by readers.
    """
    arr = np.asanyarray(array)
    return _atomic_write(Path(path), lambda fh: np.save(fh, arr, allow_pickle=False))


def _describe(path: Path, out_dir: Path) -> dict[str, Any]:
    try:
        name = path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        raise ValueError(
            f"manifest file {path} is not inside the output directory {out_dir}; "
            "a manifest may only describe files it is shipped with"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"manifest file {path} does not exist or is not a regular file")
    entry: dict[str, Any] = {
        "name": name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
    }
    if path.suffix == ".npy":
        # mmap reads only the header, so describing a huge field costs no memory.
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        entry["shape"] = list(arr.shape)
        entry["dtype"] = str(arr.dtype)
        del arr
    return entry


def write_manifest(out_dir: Path, files: list[Path], **fields: Any) -> Path:
    """Write ``out_dir/manifest.json`` describing `files`, plus any extra JSON-able `fields`.

    Hashes are computed from the files as they are on disk now, so the manifest must be
    written after the outputs are final.
    """
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {"files": [_describe(Path(f), out_dir) for f in files]}
    manifest.update(fields)
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    return _atomic_write(out_dir / "manifest.json", lambda fh: fh.write(text.encode("utf-8")))
