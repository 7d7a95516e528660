from __future__ import annotations

import uuid

import pytest

from flows.pipeline import ensure_bucket
from infra.staging.objects import IntegrityError, download, object_sha256, sha256_file, upload


@pytest.fixture
def bucket(aws):
    name = f"stage-{uuid.uuid4().hex[:8]}"
    ensure_bucket(aws, name)
    return name


def test_round_trip_is_verified(aws, bucket, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    sent = upload(aws, src, bucket, "k/src.bin")
    assert object_sha256(aws, bucket, "k/src.bin") == sent.sha256 == sha256_file(src)
    got = download(aws, bucket, "k/src.bin", tmp_path / "out" / "dst.bin")
    assert got.path.read_bytes() == src.read_bytes() and got.bytes == 256_000


def test_corrupt_object_leaves_no_file(aws, bucket, tmp_path):
    # An object whose recorded sha256 does not match its bytes (e.g. a bad writer).
    aws.client("s3").put_object(Bucket=bucket, Key="bad.bin", Body=b"actual bytes",
                                Metadata={"sha256": "00" * 32})
    dest = tmp_path / "bad.bin"
    with pytest.raises(IntegrityError, match="discarded"):
        download(aws, bucket, "bad.bin", dest)
    assert list(tmp_path.iterdir()) == []


def test_object_without_checksum_is_refused(aws, bucket, tmp_path):
    aws.client("s3").put_object(Bucket=bucket, Key="plain.bin", Body=b"x",
                                ChecksumAlgorithm="CRC32")
    with pytest.raises(IntegrityError, match="carries no SHA-256"):
        download(aws, bucket, "plain.bin", tmp_path / "plain.bin")
