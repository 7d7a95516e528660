"""The stager against the session's moto server: integrity, safety, incremental re-stage."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from flows.pipeline import ensure_bucket
from infra.staging.locations import DestinationError, StageError, UnsafeKeyError
from infra.staging.model import StageOptions
from infra.staging.objects import IntegrityError
from infra.staging.stager import Stager

MiB = 1 << 20


@pytest.fixture
def bucket(aws):
    name = f"stager-{uuid.uuid4().hex[:8]}"
    ensure_bucket(aws, name)
    return name


@pytest.fixture
def stager(aws, tmp_path):
    return Stager(aws, StageOptions(concurrency=8), cache_dir=tmp_path / "cache")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _parts(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.cfpart")]


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.bin": os.urandom(70_000),
        "empty.dat": b"",
        "nested/deeper/x.txt": b"x" * 1234,
        "ünïcødé/☃ snow man.txt": "grüße".encode(),
        "spaces and+plus/€.csv": b"1,2,3\n",
        "big.bin": os.urandom(9 * MiB),  # above small_object_limit: managed path
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_round_trip_tree_and_incremental_restage(aws, bucket, stager, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    files = _make_tree(src)
    uri = f"s3://{bucket}/data"

    up = stager.stage(str(src), uri)
    assert (up.copied, up.skipped, up.bytes_copied) == (len(files), 0, sum(map(len,
                                                                               files.values())))
    keys = {o["Key"] for o in aws.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"data/{k}" for k in files}

    down = stager.stage(uri, str(dst))
    assert down.copied == len(files) and not down.unverified
    assert _tree(dst) == files and _parts(dst) == []
    # every file was verified against a checksum S3 holds (SHA-256 for one-shot PUTs,
    # full-object CRC32 + sha256 metadata for the multipart upload)
    assert down.checks == {"sha256 (s3-checksum)": len(files) - 1,
                           "crc32 (s3-checksum), sha256 (metadata)": 1}

    again_down, again_up = stager.stage(uri, str(dst)), stager.stage(str(src), uri)
    assert (again_down.copied, again_down.skipped) == (0, len(files))
    assert (again_up.copied, again_up.skipped) == (0, len(files))
    assert again_down.verified_in_place == again_up.verified_in_place == 0  # cache, no HEADs

    # one object changes in S3, one file changes locally: exactly those move
    aws.client("s3").put_object(Bucket=bucket, Key="data/a.bin", Body=b"new contents")
    (dst / "nested/deeper/x.txt").write_bytes(b"edited locally, other size")
    r = stager.stage(uri, str(dst))
    assert (r.copied, r.skipped) == (2, len(files) - 2)
    assert (dst / "a.bin").read_bytes() == b"new contents"
    assert (dst / "nested/deeper/x.txt").read_bytes() == files["nested/deeper/x.txt"]


def test_existing_identical_tree_is_proved_by_checksum_not_copied(aws, bucket, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    no_cache = Stager(aws, StageOptions(concurrency=4))
    no_cache.stage(str(src), f"s3://{bucket}/p")
    dst = tmp_path / "dst"
    dst.mkdir()
    for rel, data in files.items():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(data)
    (dst / "a.bin").write_bytes(os.urandom(70_000))  # same size, different bytes
    r = no_cache.stage(f"s3://{bucket}/p", str(dst))
    assert (r.copied, r.verified_in_place) == (1, len(files) - 1)
    assert _tree(dst) == files


def test_corrupted_object_is_detected_and_leaves_no_file(aws, bucket, tmp_path):
    s3 = aws.client("s3")
    s3.put_object(Bucket=bucket, Key="in/good.bin", Body=b"good")
    # S3 holds a SHA-256 that does not match the bytes (a bad writer / bit rot)
    wrong = base64.b64encode(b"\x00" * 32).decode()
    s3.put_object(Bucket=bucket, Key="in/bad.bin", Body=b"actual bytes",
                  ChecksumAlgorithm="SHA256", ChecksumSHA256=wrong)
    dst = tmp_path / "dst"
    with pytest.raises(IntegrityError, match=r"bad\.bin.*discarded"):
        Stager(aws, StageOptions(concurrency=1)).stage(f"s3://{bucket}/in", str(dst))
    assert not (dst / "bad.bin").exists() and _parts(dst) == []

    # the ranged/managed path checks too: wrong sha256 metadata on a large object
    s3.put_object(Bucket=bucket, Key="big/bad.bin", Body=os.urandom(MiB),
                  Metadata={"sha256": "00" * 32})
    with pytest.raises(IntegrityError, match=r"sha256 \(metadata\)"):
        Stager(aws, StageOptions(small_object_limit=0)).stage(f"s3://{bucket}/big", str(dst))
    assert not (dst / "bad.bin").exists() and _parts(dst) == []


def test_multipart_object_from_another_tool_is_verified_by_composite_checksum(
        aws, bucket, tmp_path):
    data = os.urandom(11 * MiB)
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    aws.client("s3").upload_fileobj(io.BytesIO(data), bucket, "mp/obj.bin", Config=cfg)
    r = Stager(aws).stage(f"s3://{bucket}/mp", str(tmp_path / "d"))
    assert r.checks == {"composite crc32 (s3-composite)": 1}
    assert (tmp_path / "d" / "obj.bin").read_bytes() == data


@pytest.mark.parametrize("bad", ["../evil", "ok/../../evil", "/abs", "a//b", "a\\b", "./x"])
def test_traversal_keys_are_refused_and_nothing_is_written(aws, bucket, tmp_path, bad):
    s3 = aws.client("s3")
    s3.put_object(Bucket=bucket, Key="in/fine.txt", Body=b"fine")
    s3.put_object(Bucket=bucket, Key=f"in/{bad}", Body=b"evil")
    outside = tmp_path / "outside"
    dst = outside / "dst"
    with pytest.raises(UnsafeKeyError) as info:
        Stager(aws).stage(f"s3://{bucket}/in", str(dst))
    assert repr(f"in/{bad}") in str(info.value)
    assert not outside.exists()  # not even the destination folder was created


def test_symlinked_folder_in_destination_cannot_escape(aws, bucket, tmp_path):
    aws.client("s3").put_object(Bucket=bucket, Key="in/sub/f.txt", Body=b"x")
    elsewhere, dst = tmp_path / "elsewhere", tmp_path / "dst"
    elsewhere.mkdir()
    dst.mkdir()
    (dst / "sub").symlink_to(elsewhere)
    with pytest.raises(UnsafeKeyError, match="outside the destination"):
        Stager(aws).stage(f"s3://{bucket}/in", str(dst))
    assert list(elsewhere.iterdir()) == []


def test_empty_prefix(aws, bucket, tmp_path):
    with pytest.raises(StageError, match="holds no files"):
        Stager(aws).stage(f"s3://{bucket}/nothing-here", str(tmp_path / "d"))
    r = Stager(aws, StageOptions(allow_empty=True)).stage(f"s3://{bucket}/nothing-here",
                                                          str(tmp_path / "d"))
    assert (r.files, r.copied) == (0, 0)
    # the empty prefix (the whole bucket) stages everything; folder markers carry no data
    s3 = aws.client("s3")
    s3.put_object(Bucket=bucket, Key="top.txt", Body=b"t")
    s3.put_object(Bucket=bucket, Key="folder/", Body=b"")
    s3.put_object(Bucket=bucket, Key="folder/in.txt", Body=b"i")
    r = Stager(aws).stage(f"s3://{bucket}", str(tmp_path / "all"))
    assert r.copied == 2 and _tree(tmp_path / "all") == {"top.txt": b"t", "folder/in.txt": b"i"}


def test_missing_bucket_is_a_clear_error(aws, tmp_path):
    with pytest.raises(StageError, match="bucket does not exist"):
        Stager(aws).stage(f"s3://no-such-{uuid.uuid4().hex[:8]}/x", str(tmp_path / "d"))


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (the tests run as root, as CI does)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_destination_without_space(aws, bucket, tiny_fs):
    s3 = aws.client("s3")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"in/f{i}.bin", Body=os.urandom(400_000))
    with pytest.raises(DestinationError, match=r"not enough space on .*tiny.*nothing was staged"):
        Stager(aws).stage(f"s3://{bucket}/in", str(tiny_fs / "d"))
    assert list((tiny_fs / "d").iterdir()) == []
    # space taken by someone else after the check: the write itself fails, cleanly
    with pytest.raises(DestinationError, match="no space left on .*tiny"):
        Stager(aws, StageOptions(check_space=False, concurrency=1)).stage(
            f"s3://{bucket}/in", str(tiny_fs / "d"))
    assert _parts(tiny_fs) == []
    assert all(len(p.read_bytes()) == 400_000 for p in (tiny_fs / "d").iterdir())


def test_destination_without_permission(aws, bucket, tmp_path):
    aws.client("s3").put_object(Bucket=bucket, Key="in/f.txt", Body=b"x")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        with pytest.raises(DestinationError, match="read-only"):
            Stager(aws).stage(f"s3://{bucket}/in", str(ro / "d"))
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory is needed")
    with pytest.raises(DestinationError, match="not a directory|in the way"):
        Stager(aws).stage(f"s3://{bucket}/in", str(blocker / "d"))
    with pytest.raises(DestinationError, match="not a directory"):
        Stager(aws).stage(f"s3://{bucket}/in", str(blocker))


def test_file_and_folder_with_the_same_name_are_refused(aws, bucket, tmp_path):
    s3 = aws.client("s3")
    s3.put_object(Bucket=bucket, Key="in/x", Body=b"file")
    s3.put_object(Bucket=bucket, Key="in/x/y", Body=b"child")
    with pytest.raises(StageError, match="both a file and the folder"):
        Stager(aws).stage(f"s3://{bucket}/in", str(tmp_path / "d"))
