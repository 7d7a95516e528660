"""local -> S3, one file, with a checksum S3 verifies on receipt.

Small files are one PUT carrying their SHA-256; large ones go through s3transfer's multipart
upload with per-part CRC32s, and the stored object's checksum is compared afterwards with the
one computed here. Either way the bytes sent are the bytes hashed: a small file is read once
into memory, a large one is read through :class:`~infra.staging.verify.VerifiedSource`, so a
file rewritten during its upload fails it and leaves no object behind. A same-size object
that is already there is proved equal by checksum instead of being uploaded again.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from infra.staging.checksums import (
    Expectation,
    MultiHasher,
    expectations,
    hash_file,
    upload_part_sizes,
)
from infra.staging.execution import Run, TransferProgress
from infra.staging.locations import LocalLocation, S3Location, StageError, client_error
from infra.staging.model import Entry
from infra.staging.objects import IntegrityError
from infra.staging.verify import (
    VerifiedSource,
    b64,
    check_fields,
    checks_for,
    head_object,
    open_source,
    same_file,
    source_changed,
)


def upload_file(run: Run, e: Entry, s: LocalLocation, d: S3Location) -> None:
    path = s.root / e.rel
    key = d.key(e.rel)
    try:
        if e.size <= run.options.small_object_limit:
            with open_source(path) as f:
                data = f.read()
            hasher = MultiHasher([], ("sha256",))
            hasher.update(data)
            same_file(path, e, len(data))
            try:
                resp = run.s3.put_object(
                    Bucket=d.bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=b64(hasher.digest("sha256")))
            except ClientError as err:
                raise client_error(err, f"uploading to s3://{d.bucket}/{key}") from err
            run.progress.add_bytes(len(data))
            etag = resp["ETag"]
            check = "sha256 (verified by S3 on receipt)"
        else:
            # Per-part CRC32s (S3 verifies each part on receipt) and, computed here in
            # the same pass as the SHA-256, the composite S3 will report for them. A
            # full-object CRC32 given up front would be cheaper to compare but makes
            # s3transfer upload about 2x slower (measured in bench/staging.py).
            sizes = upload_part_sizes(e.size, run.options.multipart_chunksize)
            mine = Expectation("crc32", b"", "s3-composite", sizes)
            hasher = hash_file(path, (mine,), ("sha256", "crc32"))
            same_file(path, e, hasher.size)
            extra = {"ChecksumAlgorithm": "CRC32",
                     "Metadata": {"sha256": hasher.hexdigest("sha256")}}
            # Sent through a VerifiedSource: if the file is rewritten from here on, the
            # transfer fails before the object exists (a multipart upload is aborted).
            with VerifiedSource(path, e.size, hasher.hexdigest("sha256"),
                                f"s3://{d.bucket}/{key}") as body:
                future = run.manager.upload(body, d.bucket, key, extra_args=extra,
                                            subscribers=[TransferProgress(run.progress, e.size)])
                try:
                    run.result(future, f"uploading to s3://{d.bucket}/{key}")
                except Exception as err:
                    changed = source_changed(err)
                    if changed is None:
                        raise
                    raise changed from None
            head = head_object(run.s3, d.bucket, key)
            # This proves what is stored now is what we hashed (and catches a concurrent
            # writer to the key): size, and the CRC32 S3 holds, composite or full.
            stored = expectations(head, part_sizes=sizes)
            crc = [c for c in stored if c.algorithm == "crc32"]
            if head["ContentLength"] != e.size or any(
                    c.digest != (hasher.composite_digest(mine) if c.part_sizes
                                 else hasher.digest("crc32")) for c in crc):
                raise IntegrityError(
                    f"s3://{d.bucket}/{key}: the stored object does not match {path} after "
                    "upload (another writer?); re-run to upload it again")
            etag = head["ETag"]
            check = "crc32 (verified by S3 on receipt), sha256 (metadata)"
    except FileNotFoundError as err:
        raise StageError(f"{path} disappeared during staging; re-run") from err
    except OSError as err:
        raise StageError(f"cannot read {path}: {err.strerror or err}") from err
    rec: dict[str, Any] = {"size": e.size, "etag": etag, "local": [e.size, e.mtime_ns],
                           **check_fields(hasher), "check": check}
    run.done(e, rec, copied=True)


def verify_upload(run: Run, e: Entry, s: LocalLocation, d: S3Location) -> None:
    """A same-size object not in the cache: keep it if its checksum proves it equal."""
    head = head_object(run.s3, d.bucket, d.key(e.rel))
    checks = checks_for(run.s3, d.bucket, d.key(e.rel), head)
    if checks:
        hasher = hash_file(s.root / e.rel, checks, run.extra())
        if not hasher.mismatches() and hasher.size == head["ContentLength"]:
            rec = {"size": e.size, "etag": head["ETag"], "local": [e.size, e.mtime_ns],
                   **check_fields(hasher)}
            run.done(e, rec, copied=False, count_bytes=False)
            return
    run.progress.add_total(e.size)
    upload_file(run, e, s, d)
