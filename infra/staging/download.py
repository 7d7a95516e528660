"""S3 -> local, one file: written to a ``.cfpart`` name, verified, fsync'ed, renamed into place.

Small objects are one GET hashed while streamed; large or multipart ones go through
s3transfer's ranged GETs and are hashed from disk afterwards. Every checksum the object carries
is checked before the rename, so bad bytes never reach the final name; a same-size file that
is already there is proved equal by checksum instead of being downloaded again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError, FlexibleChecksumError

from infra.staging.checksums import CHUNK, MultiHasher, expectations, hash_file, is_multipart_etag
from infra.staging.execution import Run, TransferProgress
from infra.staging.listing import PART_SUFFIX
from infra.staging.locations import (
    DestinationError,
    DestinationRoot,
    LocalLocation,
    S3Location,
    StageError,
    client_error,
    destination_error,
)
from infra.staging.model import Entry
from infra.staging.objects import IntegrityError
from infra.staging.verify import check_fields, checks_for, head_object


def download_file(run: Run, e: Entry, s: S3Location, d: LocalLocation,
                  root: DestinationRoot) -> None:
    folder = root.folder_for(e.rel)
    final = d.root / e.rel
    stem = final.name.encode()[:64].decode(errors="ignore")
    tmp = folder / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}{PART_SUFFIX}"
    key = s.key(e.rel)
    run.live_parts.add(tmp)
    try:
        try:
            if e.size <= run.options.small_object_limit and not is_multipart_etag(e.tag):
                hasher, head = _get_small(run, s.bucket, key, e, tmp)
            else:
                hasher, head = _get_managed(run, s.bucket, key, e, tmp)
        except OSError as err:
            if isinstance(err, FileNotFoundError) and not folder.exists():
                raise DestinationError(f"{folder} vanished during staging") from err
            raise destination_error(err, final) from err
        bad = hasher.mismatches()
        if hasher.size != head["ContentLength"]:
            bad.append(f"size: expected {head['ContentLength']}, got {hasher.size}")
        if bad:
            raise IntegrityError(
                f"{s.uri}{e.rel}: downloaded bytes do not match the object's checksum "
                f"({'; '.join(bad)}); the file was discarded. The object may be corrupt in "
                "S3; re-upload it")
        try:
            if final.is_dir():
                raise IsADirectoryError(errno.EISDIR, "Is a directory", str(final))
            os.replace(tmp, final)
        except OSError as err:
            raise destination_error(err, final) from err
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        run.live_parts.discard(tmp)
    st = final.stat()
    rec = {"size": e.size, "etag": head.get("ETag", e.tag), "local": [st.st_size,
                                                                      st.st_mtime_ns]}
    rec.update(check_fields(hasher))
    run.done(e, rec, copied=True)


def _get_small(run: Run, bucket: str, key: str, e: Entry, tmp: Path,
               ) -> tuple[MultiHasher, dict[str, Any]]:
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
    if e.tag:
        kwargs["IfMatch"] = e.tag
    try:
        resp = run.s3.get_object(**kwargs)
    except ClientError as err:
        raise client_error(err, f"s3://{bucket}/{key}") from err
    hasher = MultiHasher(expectations(resp), run.extra())
    try:
        with open(tmp, "wb") as f:
            for chunk in resp["Body"].iter_chunks(CHUNK):
                if run.abort.is_set():
                    raise StageError("aborted")
                hasher.update(chunk)
                f.write(chunk)
                run.progress.add_bytes(len(chunk))
            run.sync(f)
    except FlexibleChecksumError as err:
        raise IntegrityError(
            f"s3://{bucket}/{key}: downloaded bytes do not match the object's checksum "
            f"({err}); the file was discarded. The object may be corrupt in S3") from err
    finally:
        resp["Body"].close()
    return hasher, resp


def _get_managed(run: Run, bucket: str, key: str, e: Entry, tmp: Path,
                 ) -> tuple[MultiHasher, dict[str, Any]]:
    head = head_object(run.s3, bucket, key, e.tag or None)
    checks = checks_for(run.s3, bucket, key, head)
    with open(tmp, "wb") as f:
        future = run.manager.download(
            bucket, key, f, subscribers=[TransferProgress(run.progress, head["ContentLength"],
                                                          head.get("ETag"))])
        run.result(future, f"s3://{bucket}/{key}")
        run.sync(f)
    return hash_file(tmp, checks, run.extra()), head


def verify_download(run: Run, e: Entry, s: S3Location, d: LocalLocation,
                    root: DestinationRoot) -> None:
    """A same-size local file not in the cache: keep it if its checksum proves it equal."""
    head = head_object(run.s3, s.bucket, s.key(e.rel), e.tag or None)
    checks = checks_for(run.s3, s.bucket, s.key(e.rel), head)
    path = d.root / e.rel
    if checks:
        hasher = hash_file(path, checks, run.extra())
        if not hasher.mismatches() and hasher.size == head["ContentLength"]:
            st = path.stat()
            rec = {"size": e.size, "etag": head.get("ETag", e.tag),
                   "local": [st.st_size, st.st_mtime_ns], **check_fields(hasher)}
            run.done(e, rec, copied=False, count_bytes=False)
            return
    run.progress.add_total(e.size)
    download_file(run, e, s, d, root)
