"""What the stager checks a file against, shared by both directions.

Which checksums an object carries (one HEAD, plus the part sizes a composite checksum needs),
what a finished file's manifest record says about how it was verified, and the proof that a
local file did not change between listing and reading.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from infra.staging.checksums import (
    Expectation,
    MultiHasher,
    expectations,
    is_multipart_etag,
    part_sizes_of,
    parts_count,
)
from infra.staging.locations import StageError, client_error
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
