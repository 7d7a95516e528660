"""What the stager checks a file against, shared by both directions.

Which checksums an object carries (one HEAD, plus the part sizes a composite checksum needs),
what a finished file's manifest record says about how it was verified, and the proof that a
local file did not change between listing and reading.

It also holds :class:`VerifiedSource`, what every upload reads a file through: a file that is
rewritten while it is uploaded must never leave an object whose bytes differ from the SHA-256
recorded for it.
"""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, HTTPClientError

from infra.staging.checksums import (
    Expectation,
    MultiHasher,
    expectations,
    is_multipart_etag,
    part_sizes_of,
    parts_count,
)
from infra.staging.locations import IntegrityError, StageError, client_error
from infra.staging.model import Entry


def head_object(s3: Any, bucket: str, key: str, etag: str | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
    if etag:
        kwargs["IfMatch"] = etag
    try:
        return s3.head_object(**kwargs)
    except ClientError as err:
        raise client_error(err, f"s3://{bucket}/{key}") from err


def checks_for(s3: Any, bucket: str, key: str, head: dict[str, Any]) -> list[Expectation]:
    """Every checksum ``head`` lets us verify against (composites need the part sizes)."""
    checks = expectations(head)
    if not checks and is_multipart_etag(head.get("ETag")):
        sizes = part_sizes_of(s3, bucket, key, head["ContentLength"],
                              parts_count(head.get("ETag")))
        if sizes:
            checks = expectations(head, part_sizes=sizes)
    return checks


def check_fields(hasher: MultiHasher) -> dict[str, Any]:
    """The manifest record's ``check`` (how the file was verified) and ``sha256`` fields."""
    out: dict[str, Any] = {}
    if hasher.checks:
        out["check"] = ", ".join(sorted({c.label for c in hasher.checks}))
    if hasher.has("sha256"):
        out["sha256"] = hasher.hexdigest("sha256")
    return out


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def same_file(path: Path, e: Entry, size: int) -> None:
    st = path.stat()
    if st.st_size != e.size or st.st_mtime_ns != e.mtime_ns or size != e.size:
        raise StageError(f"{path} changed while it was being staged; re-run once it is stable")


class SourceChangedError(IntegrityError):
    """A file's bytes changed while they were uploaded; the object was not written."""


class VerifiedSource(io.RawIOBase):
    """A read-only view of ``path`` that refuses to hand out its last byte unless every byte it
    handed out, from the start, hashes to ``sha256`` (hex) and totals ``size``.

    An upload hashes the file first (the SHA-256 goes into the object's metadata) and reads it
    again to send it; a writer in between would make S3 store other bytes under that metadata.
    S3 verifies a checksum only against the bytes it receives (and moto not even that), so the
    check has to happen here, on the bytes actually sent, and before the last of them leaves:
    a single PUT is then cut short, and a multipart upload fails before CompleteMultipartUpload,
    which s3transfer answers with AbortMultipartUpload. Either way the final key never holds
    the mixed bytes (and an older object there is left as it was). A seek back to 0 (botocore
    reads a body once for its checksum and again to send it, and again on a retry) starts the
    hash over, so every pass is checked.
    """

    def __init__(self, path: Path, size: int, sha256: str, what: str) -> None:
        super().__init__()
        self.path, self.size, self.expected, self.what = path, size, sha256, what
        self._f = open_source(path)
        self._pos = 0
        self._hash = hashlib.sha256()
        self._hashed = 0  # bytes hashed in order from 0; equals _pos while reading in order

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, min(base + offset, self.size))
        self._f.seek(self._pos)
        if self._pos == 0:
            self._hash, self._hashed = hashlib.sha256(), 0
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        want = self.size - self._pos if n is None or n < 0 else min(n, self.size - self._pos)
        data = self._f.read(want) if want > 0 else b""
        if self._hashed == self._pos:
            self._hash.update(data)
            self._hashed += len(data)
        self._pos += len(data)
        if self._pos >= self.size or len(data) < want:
            self._check(short=len(data) < want)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _check(self, short: bool) -> None:
        if short:
            why = f"it is now shorter than the {self.size} bytes it had"
        elif self._hashed != self.size:
            why = "its bytes were read out of order and cannot be verified"
        elif self._hash.hexdigest() != self.expected:
            why = "its bytes no longer match the SHA-256 taken before the upload"
        else:
            return
        raise SourceChangedError(
            f"{self.path} changed while it was being uploaded to {self.what} ({why}); the "
            "object was not written. Re-run once the file is stable")

    def close(self) -> None:
        self._f.close()
        super().close()


def open_source(path: Path) -> Any:
    """Open a source file for upload (one place, so a test can hand out a changing file)."""
    return path.open("rb")


def source_changed(err: BaseException) -> SourceChangedError | None:
    """The :class:`SourceChangedError` behind ``err``: botocore wraps what a body's read raises
    in ``HTTPClientError`` (after retrying it, each retry re-checked)."""
    if isinstance(err, SourceChangedError):
        return err
    if isinstance(err, HTTPClientError) and isinstance(err.kwargs.get("error"),
                                                       SourceChangedError):
        return err.kwargs["error"]
    return None
