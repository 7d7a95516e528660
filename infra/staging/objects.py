"""Moving files between S3 and the scratch filesystem, integrity-checked.

Uploads carry a SHA-256 that S3 verifies on receipt (``ChecksumAlgorithm``) and stores, so a
reader can check an object without downloading it twice; downloads are hashed while written
to a temporary name and only renamed into place when the hash matches, so a partial or corrupt
file never appears under its final name. An upload sends the file through
:class:`~infra.staging.verify.VerifiedSource`, so a file rewritten while it is uploaded fails the
upload before the object exists instead of leaving bytes that differ from their ``sha256``.
A download's temporary file is named like the stager's (``.<name>.<pid>.<rand>.cfpart``), so
the one a killed process left is removed by the next download to the same name.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget
from infra.staging.listing import PART_SUFFIX, remove_dead_part
from infra.staging.locations import IntegrityError
from infra.staging.verify import VerifiedSource, source_changed

CHUNK = 1 << 20
# Below the threshold one PUT carries a full-object SHA-256; above it S3 keeps a composite
# checksum ("...-N"), which readers verify by hashing the stream instead.
TRANSFER = TransferConfig(multipart_threshold=64 * CHUNK, multipart_chunksize=16 * CHUNK)


@dataclass(frozen=True)
class Transferred:
    uri: str
    path: Path
    bytes: int
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _b64_to_hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def _hex_to_b64(hexdigest: str) -> str:
    return base64.b64encode(bytes.fromhex(hexdigest)).decode()


def object_sha256(aws: AwsTarget, bucket: str, key: str) -> str | None:
    """The full-object SHA-256 S3 stored for ``key`` (hex), or None if it has none."""
    head = aws.client("s3").head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    value = head.get("ChecksumSHA256")
    if value and "-" not in value and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT":
        return _b64_to_hex(value)
    return None


def streamed_sha256(aws: AwsTarget, bucket: str, key: str) -> tuple[str, int]:
    body = aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"]
    h, n = hashlib.sha256(), 0
    for chunk in body.iter_chunks(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def exists(aws: AwsTarget, bucket: str, key: str) -> bool:
    try:
        aws.client("s3").head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise


def upload(aws: AwsTarget, path: Path, bucket: str, key: str) -> Transferred:
    digest = sha256_file(path)
    size = path.stat().st_size
    extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": digest}}
    try:
        with VerifiedSource(path, size, digest, f"s3://{bucket}/{key}") as body:
            if size < TRANSFER.multipart_threshold:
                # Hand S3 our own digest: it rejects the PUT if the bytes it got hash
                # differently (and the VerifiedSource refuses to send other bytes at all).
                aws.client("s3").put_object(Bucket=bucket, Key=key, Body=body,
                                            ChecksumAlgorithm="SHA256",
                                            ChecksumSHA256=_hex_to_b64(digest),
                                            Metadata={"sha256": digest})
            else:
                aws.client("s3").upload_fileobj(body, bucket, key, ExtraArgs=extra,
                                                Config=TRANSFER)
    except Exception as err:
        changed = source_changed(err)
        if changed is None:
            raise
        raise changed from None
    return Transferred(uri=f"s3://{bucket}/{key}", path=path, bytes=size, sha256=digest)


def download(aws: AwsTarget, bucket: str, key: str, dest: Path) -> Transferred:
    """Download ``key`` to ``dest`` and verify it against the SHA-256 S3 holds for it."""
    s3 = aws.client("s3")
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    expected = head.get("Metadata", {}).get("sha256")
    stored = head.get("ChecksumSHA256")
    if stored and "-" not in stored:
        expected = _b64_to_hex(stored)
    if not expected:
        raise IntegrityError(
            f"s3://{bucket}/{key} carries no SHA-256 (neither an S3 checksum nor sha256 "
            "metadata); re-upload it with clusterflow so it can be verified"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{dest.name.encode()[:64].decode(errors='ignore')}."
    for old in dest.parent.glob(f"{glob.escape(stem)}*{PART_SUFFIX}"):
        remove_dead_part(old)  # a killed download's temporary file (its pid is gone)
    tmp = dest.parent / f"{stem}{os.getpid()}.{secrets.token_hex(4)}{PART_SUFFIX}"
    try:
        with open(tmp, "xb") as f:
            s3.download_fileobj(bucket, key, f, Config=TRANSFER)
            f.flush()
            os.fsync(f.fileno())
        got = sha256_file(Path(tmp))
        if got != expected:
            raise IntegrityError(
                f"s3://{bucket}/{key}: downloaded SHA-256 {got} != expected {expected}; "
                "the file was discarded"
            )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Transferred(uri=f"s3://{bucket}/{key}", path=dest, bytes=dest.stat().st_size,
                       sha256=expected)
