"""Reading telemetry back: imbalance, slowest rank and step, on constructed data and from S3."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.telemetry.reader import summarize

BIN = Path(sys.executable).parent


def _steps(rank: int, seconds: list[float], every: int = 1) -> list[dict]:
    return [{"run_id": "r", "rank": rank, "kind": "step", "step": (i + 1) * every,
             "steps": every, "seconds": s, "wait_seconds": s / 10, "bytes": 100}
            for i, s in enumerate(seconds)]


def test_imbalance_is_slowest_rank_over_mean_on_constructed_data():
    # rank totals 3, 3, 6 -> mean 4 -> imbalance 1.5; slowest step: rank 2's 3.0 s at step 2
    recs = _steps(0, [1, 1, 1]) + _steps(1, [1, 1, 1]) + _steps(2, [1, 3, 2])
    recs.append({"run_id": "r", "rank": 0, "phase": "user"})  # a user's own record
    s = summarize("r", recs)
    assert s.load_imbalance == pytest.approx(1.5)
    assert s.slowest_rank == 2
    assert s.slowest_step == {"rank": 2, "step": 2, "seconds": 3.0}
    assert [r.seconds for r in s.ranks] == [3, 3, 6] and s.other == 1


def test_sampled_records_count_the_steps_they_stand_for():
    # every 5th step reported: each record's seconds are the mean over its 5 steps
    s = summarize("r", _steps(0, [2.0, 2.0], every=5) + _steps(1, [1.0, 1.0], every=5))
    assert [r.steps for r in s.ranks] == [10, 10]
    assert [r.seconds for r in s.ranks] == [20.0, 10.0]
    assert s.load_imbalance == pytest.approx(20 / 15)


def _put(aws, bucket: str, run: str, recs: list[dict]) -> None:
    body = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in recs))
    aws.client("s3").put_object(Bucket=bucket, Key=f"telemetry/run_id={run}/x-1.gz", Body=body)


def test_show_cli_reads_s3_and_flags_an_unknown_run(aws, tmp_path):
    bucket = "tele-reader"
    aws.client("s3").create_bucket(Bucket=bucket)
    _put(aws, bucket, "ghost", _steps(0, [1, 1]) + _steps(1, [1, 3]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=aws.endpoint_url, AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", CLUSTERFLOW_HOME=str(tmp_path / "home"))
    cmd = [str(BIN / "clusterflow"), "telemetry", "show", "ghost", "--bucket", bucket]
    out = subprocess.run([*cmd, "--json", "--png", str(tmp_path / "t.png")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["registered"] is False and data["slowest_rank"] == 1
    assert data["load_imbalance"] == pytest.approx(4 / 3)
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    text = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "not a run clusterflow started" in text.stdout
    missing = subprocess.run([*cmd[:3], "nosuchrun", "--bucket", bucket], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "no telemetry for run nosuchrun" in missing.stderr
    assert "Traceback" not in missing.stderr
