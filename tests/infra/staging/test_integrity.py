"""Integrity of staged data (issue 13, class 3), against the session's moto server and real files:
a source rewritten during its upload leaves no object; symlinks in a source tree are refused,
followed or reported, never silently; what a killed run leaves is reclaimed by the next one."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from typer.testing import CliRunner

from flows.pipeline import ensure_bucket
from infra.staging import objects, verify
from infra.staging.cli import register
from infra.staging.locations import OutsideLinkError, StageError
from infra.staging.model import StageOptions
from infra.staging.objects import IntegrityError
from infra.staging.stager import Stager
from infra.staging.verify import SourceChangedError

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def bucket(aws):
    name = f"integrity-{uuid.uuid4().hex[:8]}"
    ensure_bucket(aws, name)
    return name


class _Rewritten:
    """A source file that another writer rewrites (same size) just after the upload's first
    read: deterministic, no timers. ``reads`` counts reads so a test can see it was used."""

    def __init__(self, path: Path, at: int, new: bytes) -> None:
        self.path, self.at, self.new = path, at, new
        self._f = path.open("rb")
        self.reads = 0

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        if self.reads == 1:
            with self.path.open("r+b") as w:
                w.seek(self.at)
                w.write(self.new)
        return self._f.read(n)

    def seek(self, *a: Any) -> int:
        return self._f.seek(*a)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()


def _rewrite_on_read(monkeypatch, path: Path, at: int) -> None:
    def opener(p: Path) -> Any:
        if p == path:
            return _Rewritten(p, at, b"\xff" * 4096)
        return p.open("rb")

    monkeypatch.setattr(verify, "open_source", opener)


def _open_uploads(aws, bucket: str, prefix: str = "") -> list[str]:
    return [u["Key"] for u in aws.client("s3").list_multipart_uploads(
        Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def _head(aws, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        return aws.client("s3").head_object(Bucket=bucket, Key=key)
    except ClientError:
        return None


# ------------------------------------------------------------------ a file changing mid-upload
@pytest.mark.parametrize("size, options", [
    # above small_object_limit, below the multipart threshold: one streamed PUT
    (6 * MiB, StageOptions(small_object_limit=MiB)),
    # multipart: the mismatch is found before CompleteMultipartUpload, which is never sent
    (12 * MiB, StageOptions(small_object_limit=MiB, multipart_threshold=5 * MiB,
                            multipart_chunksize=5 * MiB)),
], ids=["single-put", "multipart"])
def test_stager_upload_of_a_file_rewritten_mid_upload_leaves_the_old_object(
        aws, bucket, tmp_path, monkeypatch, size, options):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "data.bin"
    old = os.urandom(size)
    f.write_bytes(old)
    uri = f"s3://{bucket}/p"
    Stager(aws, options).stage(str(src), uri)  # a first, good version under the key
    new = os.urandom(size)
    f.write_bytes(new)
    os.utime(f, ns=(1, 1))  # a different mtime: the stager must upload it again

    _rewrite_on_read(monkeypatch, f, size - 8192)  # the tail changes after the hash
    with pytest.raises(SourceChangedError, match=r"data\.bin changed while it was being "
                       r"uploaded .*the object was not written"):
        Stager(aws, options).stage(str(src), uri)
    # the key still holds the old version, whole, and it matches its recorded checksums
    body = aws.client("s3").get_object(Bucket=bucket, Key="p/data.bin")["Body"].read()
    assert body == old
    head = _head(aws, bucket, "p/data.bin")
    assert head and head["Metadata"]["sha256"] == hashlib.sha256(old).hexdigest()
    assert _open_uploads(aws, bucket) == []  # an aborted multipart upload leaves no parts

    # a fresh key: nothing at all is left under it
    os.utime(f, ns=(2, 2))
    _rewrite_on_read(monkeypatch, f, 0)
    with pytest.raises(SourceChangedError):
        Stager(aws, options).stage(str(src), f"s3://{bucket}/fresh")
    assert _head(aws, bucket, "fresh/data.bin") is None and _open_uploads(aws, bucket) == []


@pytest.mark.parametrize("threshold", [64 * MiB, 5 * MiB], ids=["single-put", "multipart"])
def test_single_object_upload_of_a_rewritten_file_leaves_nothing(aws, bucket, tmp_path,
                                                                  monkeypatch, threshold):
    monkeypatch.setattr(objects, "TRANSFER", TransferConfig(multipart_threshold=threshold,
                                                            multipart_chunksize=5 * MiB))
    f = tmp_path / "result.npy"
    f.write_bytes(os.urandom(11 * MiB))
    _rewrite_on_read(monkeypatch, f, 6 * MiB)
    with pytest.raises(SourceChangedError, match="result.npy changed"):
        objects.upload(aws, f, bucket, "out/result.npy")
    assert _head(aws, bucket, "out/result.npy") is None and _open_uploads(aws, bucket) == []
    # unchanged, it uploads and its sha256 metadata is the content's
    monkeypatch.setattr(verify, "open_source", lambda p: p.open("rb"))
    got = objects.upload(aws, f, bucket, "out/result.npy")
    body = aws.client("s3").get_object(Bucket=bucket, Key="out/result.npy")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == got.sha256 == objects.sha256_file(f)


def _cli(args: list[str], env: dict[str, str]) -> Any:
    import typer

    app = typer.Typer(add_completion=False)
    register(app)

    @app.callback()
    def _root() -> None:
        """clusterflow staging."""

    return CliRunner().invoke(app, ["stage", *args], env=env)


def test_cli_reports_a_changed_file_and_a_corrupt_object_in_one_line(
        aws, bucket, tmp_path, monkeypatch, moto_server):
    env = {"AWS_ENDPOINT_URL": moto_server.url, "CLUSTERFLOW_HOME": str(tmp_path / "home")}
    src = tmp_path / "src"
    src.mkdir()
    f = src / "big.bin"
    f.write_bytes(os.urandom(9 * MiB))  # above the CLI's 8 MiB one-request limit
    _rewrite_on_read(monkeypatch, f, MiB)
    r = _cli([str(src), f"s3://{bucket}/cli"], env)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "big.bin changed while it was being uploaded" in lines[0]
    assert _head(aws, bucket, "cli/big.bin") is None

    wrong = base64.b64encode(b"\0" * 32).decode()
    aws.client("s3").put_object(Bucket=bucket, Key="bad/x.bin", Body=b"bytes",
                                ChecksumAlgorithm="SHA256", ChecksumSHA256=wrong)
    r = _cli([f"s3://{bucket}/bad", str(tmp_path / "d")], env)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "do not match the object's checksum" in r.output
    assert not (tmp_path / "d" / "x.bin").exists()
    assert issubclass(SourceChangedError, IntegrityError) and issubclass(IntegrityError, StageError)


# ------------------------------------------------------------------ symlinks in a source tree
def _linked_tree(tmp_path: Path) -> tuple[Path, Path]:
    src, outside = tmp_path / "src", tmp_path / "outside"
    (src / "sub").mkdir(parents=True)
    outside.mkdir()
    (src / "a.txt").write_text("a")
    (src / "sub" / "x.txt").write_text("x")
    (outside / "secret.txt").write_text("not yours")
    (src / "same-a.txt").symlink_to("a.txt")           # a file inside: staged as a file
    (src / "sub-link").symlink_to("sub")                # a directory inside: left out
    (src / "dangling").symlink_to("no-such-file")       # dangling: left out
    (src / "sub" / "up").symlink_to("..")               # a loop
    os.mkfifo(src / "pipe")                             # not a regular file: left out
    return src, outside


def test_symlinks_leaving_the_tree_are_refused_and_every_left_out_entry_is_reported(
        aws, bucket, tmp_path):
    src, outside = _linked_tree(tmp_path)
    (src / "passwd").symlink_to(outside / "secret.txt")
    with pytest.raises(OutsideLinkError, match=r"'passwd' -> .*secret\.txt.*--follow-links"):
        Stager(aws).stage(str(src), f"s3://{bucket}/t")
    assert aws.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount") == 0

    (src / "passwd").unlink()
    r = Stager(aws).stage(str(src), f"s3://{bucket}/t")
    keys = {o["Key"] for o in aws.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"t/a.txt", "t/same-a.txt", "t/sub/x.txt"}
    reasons = {x["path"]: x["reason"] for x in r.skipped_entries}
    assert set(reasons) == {"sub-link", "dangling", "pipe", "sub/up"}
    assert reasons["dangling"].startswith("dangling symlink")
    assert reasons["sub-link"].startswith("symlink to a directory")
    assert reasons["pipe"] == "not a regular file (FIFO)"
    s = r.summary()
    assert (s["files"], s["copied"], s["skipped"]) == (3, 3, 4)
    assert s["skipped_entries"] == r.skipped_entries


def test_follow_links_uploads_what_links_point_to_and_cuts_loops(aws, bucket, tmp_path):
    src, outside = _linked_tree(tmp_path)
    (src / "passwd").symlink_to(outside / "secret.txt")
    (src / "ext").symlink_to(outside)
    r = Stager(aws, StageOptions(follow_links=True)).stage(str(src), f"s3://{bucket}/f")
    keys = {o["Key"] for o in aws.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"f/a.txt", "f/same-a.txt", "f/sub/x.txt", "f/sub-link/x.txt",
                    "f/passwd", "f/ext/secret.txt"}
    reasons = {x["path"]: x["reason"] for x in r.skipped_entries}
    assert set(reasons) == {"dangling", "pipe", "sub/up", "sub-link/up"}
    assert reasons["sub/up"].startswith("symlink loop")


def test_cli_json_reports_skipped_entries_and_refuses_outside_links(aws, bucket, tmp_path,
                                                                     moto_server):
    src, outside = _linked_tree(tmp_path)
    (src / "passwd").symlink_to(outside / "secret.txt")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
           "AWS_ENDPOINT_URL": moto_server.url, "CLUSTERFLOW_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "infra.staging.cli", "stage", str(src), f"s3://{bucket}/c",
           "--json"]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "refused" in p.stderr and "passwd" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([*cmd, "--follow-links"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["skipped"] == len(s["skipped_entries"]) == 4
    assert {x["path"] for x in s["skipped_entries"]} == {"dangling", "pipe", "sub/up",
                                                        "sub-link/up"}


# ------------------------------------------------------------------ what a killed run leaves
_KILLED_UPLOAD = """
import os, signal, sys, time
from pathlib import Path
from infra.aws.clients import AwsTarget
from infra.staging import verify
from infra.staging.model import StageOptions
from infra.staging.stager import Stager

src, uri, journal, sig = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
# as `clusterflow stage` does: SIGTERM (a scheduler's kill, `timeout`) unwinds like Ctrl-C
signal.signal(signal.SIGTERM, signal.default_int_handler)

class Killing:
    # After the upload is journaled and its first part read, the signal arrives.
    def __init__(self, p):
        self.f, self.n = p.open("rb"), 0
    def read(self, n=-1):
        self.n += 1
        if self.n == 2:
            deadline = time.monotonic() + 30
            while not any(journal.glob("*.jsonl")) and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(os.getpid(), sig)
        return self.f.read(n)
    def seek(self, *a): return self.f.seek(*a)
    def tell(self): return self.f.tell()
    def close(self): self.f.close()

verify.open_source = Killing
aws = AwsTarget(region="us-east-1", endpoint_url=os.environ["AWS_ENDPOINT_URL"], embedded=True)
try:
    Stager(aws, StageOptions(small_object_limit=1 << 20, multipart_threshold=5 << 20,
                             multipart_chunksize=5 << 20), journal_dir=journal).stage(str(src), uri)
except KeyboardInterrupt:
    sys.exit(130)
"""


def _killed_upload(src: Path, uri: str, journal: Path, url: str, sig: int) -> int:
    env = {**os.environ, "AWS_ENDPOINT_URL": url}
    p = subprocess.run([sys.executable, "-c", _KILLED_UPLOAD, str(src), uri, str(journal),
                        str(int(sig))], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    return p.returncode


def test_sigterm_mid_upload_aborts_its_multipart_upload(aws, bucket, tmp_path, moto_server):
    src, journal = tmp_path / "src", tmp_path / "journal"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(16 * MiB))
    rc = _killed_upload(src, f"s3://{bucket}/t", journal, moto_server.url, signal.SIGTERM)
    assert rc == 130
    assert _open_uploads(aws, bucket) == [] and _head(aws, bucket, "t/big.bin") is None
    assert list(journal.glob("*.jsonl")) == []  # nothing left for a next run to reclaim


def test_a_killed_upload_is_reclaimed_by_the_next_run(aws, bucket, tmp_path, moto_server):
    src, journal = tmp_path / "src", tmp_path / "journal"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(16 * MiB))
    uri = f"s3://{bucket}/k"
    # someone else's open upload under the same prefix: reported, never aborted by us
    foreign = aws.client("s3").create_multipart_upload(Bucket=bucket, Key="k/other.bin")
    rc = _killed_upload(src, uri, journal, moto_server.url, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert sorted(_open_uploads(aws, bucket, "k/")) == ["k/big.bin", "k/other.bin"]
    assert len(list(journal.glob("*.jsonl"))) == 1

    r = Stager(aws, StageOptions(small_object_limit=MiB, multipart_threshold=5 * MiB,
                                 multipart_chunksize=5 * MiB), journal_dir=journal).stage(
        str(src), uri)
    assert r.reclaimed_uploads == 1 and r.copied == 1
    assert _open_uploads(aws, bucket, "k/") == ["k/other.bin"]
    assert r.incomplete_uploads == ["k/other.bin"]
    assert r.summary()["incomplete_uploads"] == 1
    assert list(journal.glob("*.jsonl")) == []  # the finished run left no journal either
    aws.client("s3").abort_multipart_upload(Bucket=bucket, Key="k/other.bin",
                                            UploadId=foreign["UploadId"])


def test_a_killed_single_object_download_part_is_removed_by_the_next(aws, bucket, tmp_path):
    objects_dir = tmp_path / "scratch"
    objects_dir.mkdir()
    f = tmp_path / "f.bin"
    f.write_bytes(b"payload")
    objects.upload(aws, f, bucket, "in/f.bin")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = objects_dir / f".f.bin.{dead.pid}.abcd1234.cfpart"
    live = objects_dir / f".f.bin.{os.getppid()}.abcd1234.cfpart"  # a running writer's
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    objects.download(aws, bucket, "in/f.bin", objects_dir / "f.bin")
    assert (objects_dir / "f.bin").read_bytes() == b"payload"
    assert not stale.exists() and live.exists()


def test_buckets_clusterflow_creates_abort_incomplete_multipart_uploads(aws, bucket):
    rules = aws.client("s3").get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert [r["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] for r in rules
            if r["Status"] == "Enabled" and "AbortIncompleteMultipartUpload" in r] == [7]


def test_a_killed_manifest_rewrite_is_removed_by_the_next_run(aws, bucket, tmp_path):
    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    (src / "a.txt").write_text("a")
    Stager(aws, cache_dir=cache).stage(str(src), f"s3://{bucket}/m")
    (manifest,) = cache.glob("*.jsonl")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = cache / f".{manifest.name}.{dead.pid}.tmp"
    stale.write_text("half a rewrite")
    (src / "b.txt").write_text("b")
    r = Stager(aws, cache_dir=cache).stage(str(src), f"s3://{bucket}/m")
    assert r.copied == 1 and not stale.exists()
