"""``stage`` as a user runs it: a separate process, killed mid-transfer, resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.pipeline import ensure_bucket

REPO = Path(__file__).resolve().parents[3]
# The kill comes after 40 files; the other ~1000 keep the first run busy for several seconds,
# so a test process stalled on a loaded machine still finds it running.
FILES = 1200


def _stage(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen[str]:
    # `clusterflow stage` once mounted; the module's own entry point runs the same command.
    return subprocess.Popen([sys.executable, "-m", "infra.staging.cli", "stage", *args], env=env,
                            cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


@pytest.fixture
def env(moto_server, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    e.update(AWS_ENDPOINT_URL=moto_server.url, CLUSTERFLOW_HOME=str(tmp_path / "home"))
    return e


@pytest.fixture
def many_objects(aws):
    bucket = f"cli-{uuid.uuid4().hex[:8]}"
    ensure_bucket(aws, bucket)
    s3 = aws.client("s3")

    def put(i: int) -> None:
        s3.put_object(Bucket=bucket, Key=f"in/d{i % 5}/f{i:04d}.bin",
                      Body=i.to_bytes(4, "big") * 4096, ChecksumAlgorithm="SHA256")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(FILES)))
    return bucket


def _finals(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".cfpart")]


def test_resume_after_kill_moves_only_the_rest(env, many_objects, tmp_path):
    src, dst = f"s3://{many_objects}/in", tmp_path / "dst"
    proc = _stage([src, str(dst), "--concurrency", "2"], env)
    deadline = time.monotonic() + 60
    while not dst.exists() or len(_finals(dst)) < 40:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    present = len(_finals(dst))
    assert 40 <= present < FILES, "the transfer finished before it could be killed"

    second = _stage([src, str(dst), "--json"], env)
    out, errs = second.communicate(timeout=120)
    assert second.returncode == 0, errs
    summary = json.loads(out)
    # every file that had reached its final name was complete and is kept; only the rest moves
    assert summary["copied"] == FILES - present
    assert summary["skipped"] == present and summary["files"] == FILES
    assert [p for p in dst.rglob("*.cfpart")] == []  # the killed run's partial files are gone
    for i in (0, 599, FILES - 1):
        assert (dst / f"d{i % 5}/f{i:04d}.bin").read_bytes() == i.to_bytes(4, "big") * 4096

    third = _stage([src, str(dst), "--json"], env)
    out, errs = third.communicate(timeout=120)
    assert json.loads(out)["copied"] == 0 and json.loads(out)["skipped"] == FILES


def test_cli_refuses_an_unsafe_key_naming_it(env, aws, tmp_path):
    bucket = f"cli-{uuid.uuid4().hex[:8]}"
    ensure_bucket(aws, bucket)
    aws.client("s3").put_object(Bucket=bucket, Key="in/../../etc/cron.d/x", Body=b"evil")
    proc = _stage([f"s3://{bucket}/in", str(tmp_path / "dst")], env)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "in/../../etc/cron.d/x" in errs and "refused" in errs
    assert not (tmp_path / "dst").exists()


def test_cli_upload_json_summary(env, aws, tmp_path):
    bucket = f"cli-{uuid.uuid4().hex[:8]}"
    ensure_bucket(aws, bucket)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    (src / "z").write_bytes(b"")
    proc = _stage([str(src), f"s3://{bucket}/out/", "--json"], env)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 0, errs
    s = json.loads(out)
    assert {k: s[k] for k in ("files", "copied", "bytes_copied", "skipped")} == {
        "files": 2, "copied": 2, "bytes_copied": 1, "skipped": 0}
    assert isinstance(s["seconds"], float) and s["dst"] == f"s3://{bucket}/out/"
    body = aws.client("s3").get_object(Bucket=bucket, Key="out/a.txt")["Body"].read()
    assert body == b"a"
