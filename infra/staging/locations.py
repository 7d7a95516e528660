"""The two ends of a staging transfer, and the rules that keep keys inside the destination.

An S3 key is arbitrary text, so a listing can hold ``../../etc/passwd``, ``/abs``, ``a//b`` or
``a\\b``; a naive ``dest / key`` would write outside the destination or somewhere surprising.
Every key is checked before anything is written, and the whole transfer is refused naming the
offending key, rather than copying the good part of a listing an attacker shaped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

NAME_MAX = 255


class StageError(RuntimeError):
    """A staging transfer cannot go ahead or did not complete; the message says why."""


class UnsafeKeyError(StageError):
    """A source key would land outside the destination (or nowhere sensible)."""


class IntegrityError(StageError):
    """Data did not match its checksum; nothing was left under the final name."""


class OutsideLinkError(StageError):
    """A symlink in a local source tree points outside it (refused unless links are followed)."""


class DestinationError(StageError):
    """The destination cannot take the data: no space, no permission, a file in the way."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" (whole bucket) or ending in "/"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, rel: str) -> str:
        return self.prefix + rel


@dataclass(frozen=True)
class LocalLocation:
    root: Path

    @property
    def uri(self) -> str:
        return str(self.root)


Location = S3Location | LocalLocation


def parse_location(text: str) -> Location:
    """``s3://bucket[/prefix]`` or a local directory; a prefix always names a folder."""
    if text.startswith("s3://"):
        rest = text[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise StageError(f"{text!r}: no bucket name (expected s3://bucket/prefix)")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if prefix.startswith("/") or "//" in prefix:
            raise StageError(f"{text!r}: the prefix has an empty path segment")
        return S3Location(bucket, prefix)
    if "://" in text:
        raise StageError(f"{text!r}: only s3:// URIs and local directories can be staged")
    return LocalLocation(Path(text).expanduser().absolute())


def check_relative_key(rel: str, full_key: str) -> None:
    """Refuse a key (relative to the source prefix) that is not a plain relative path."""
    why = None
    if not rel:
        why = "it is empty after the prefix"
    elif rel.startswith("/"):
        why = "it is an absolute path"
    elif "\\" in rel:
        why = "it contains a backslash"
    elif "\0" in rel:
        why = "it contains a NUL byte"
    else:
        for seg in rel.split("/"):
            if seg == "":
                why = "it has an empty path segment"
            elif seg in (".", ".."):
                why = f"it has a '{seg}' path segment"
            elif len(seg.encode()) > NAME_MAX:
                why = f"a path segment is longer than {NAME_MAX} bytes"
            if why:
                break
    if why:
        raise UnsafeKeyError(
            f"refusing key {full_key!r}: {why}, so it could land outside the destination; "
            "nothing was staged (rename or delete that object, or stage a narrower prefix)"
        )


def is_directory_marker(rel: str, size: int) -> bool:
    """The zero-byte ``folder/`` objects the S3 console creates; they carry no data."""
    return size == 0 and rel.endswith("/") and rel != "/" and "//" not in rel


class DestinationRoot:
    """Creates folders under a local root and proves each one really is under it.

    A folder inside the destination may be a symlink pointing elsewhere; writing through it
    would escape the root, so each folder's real path is checked once before it is used.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._real_root: str | None = None
        self._checked: set[str] = set()

    def prepare(self) -> None:
        try:
            if self.root.exists() and not self.root.is_dir():
                raise DestinationError(f"{self.root} exists and is not a directory")
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise destination_error(e, self.root) from e
        self._real_root = os.path.realpath(self.root)

    def folder_for(self, rel: str) -> Path:
        """The (created, checked) folder that ``rel`` goes into."""
        assert self._real_root is not None, "prepare() first"
        parent = rel.rpartition("/")[0]
        folder = self.root / parent if parent else self.root
        if parent not in self._checked:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise destination_error(e, folder) from e
            real = os.path.realpath(folder)
            if real != self._real_root and not real.startswith(self._real_root + os.sep):
                raise UnsafeKeyError(
                    f"refusing to write {rel!r}: {folder} resolves to {real}, outside the "
                    f"destination {self.root} (a symlink in the destination?)"
                )
            self._checked.add(parent)
        return folder


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def destination_error(e: OSError, where: Path) -> StageError:
    """Turn a filesystem error into one a user can act on (space, permission, a file in the way)."""
    import errno

    fs = _mount_point(where)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(where)
        what = "no space left" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return DestinationError(
            f"{what} on {fs} while writing {e.filename or where} "
            f"({human_bytes(free)} free); free some space or stage to another filesystem. "
            "The partial file was removed; a re-run copies only what is missing"
        )
    if e.errno in (errno.EACCES, errno.EPERM):
        return DestinationError(
            f"permission denied writing {e.filename or where}: the destination is not writable "
            "by this user; fix its permissions or choose another destination"
        )
    if e.errno == errno.EROFS:
        return DestinationError(
            f"{fs} is mounted read-only, so {e.filename or where} cannot be written; "
            "stage to a writable filesystem"
        )
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return DestinationError(
            f"cannot create {e.filename or where}: a file is in the way where a directory is "
            "needed; move it aside or choose another destination"
        )
    if e.errno == errno.EISDIR:
        return DestinationError(
            f"cannot write {e.filename or where}: a directory is in the way where a file is "
            "needed (the source has both 'x' and 'x/...'?)"
        )
    return DestinationError(f"cannot write {e.filename or where}: {e.strerror or e}")


def client_error(e: ClientError, what: str) -> StageError:
    """Turn an S3 error into one a user can act on (missing bucket, access, a changed object)."""
    code = e.response.get("Error", {}).get("Code", "")
    if code in ("NoSuchBucket",):
        return StageError(f"{what}: the bucket does not exist (check the name and region)")
    if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                "SignatureDoesNotMatch"):
        return StageError(f"{what}: access denied ({code}); the credentials in use may not "
                          "read/write this bucket or prefix")
    if code in ("NoSuchKey", "404", "NotFound"):
        return StageError(f"{what}: the object was deleted while it was being staged; re-run")
    if code in ("PreconditionFailed", "412"):
        return StageError(f"{what}: the object changed while it was being staged; re-run to "
                          "stage the new version")
    return StageError(f"{what}: {code or 'error'}: {e}")


def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(_existing_ancestor(path))
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def free_bytes(path: Path) -> int:
    return _free_bytes(path)


def _mount_point(path: Path) -> str:
    p = Path(os.path.realpath(_existing_ancestor(path)))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def mount_point(path: Path) -> str:
    return _mount_point(path)
