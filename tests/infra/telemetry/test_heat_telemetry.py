"""A real 2-rank heat run (mpiexec) reporting per step, through both transports, into S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infra.telemetry.job import telemetry_env
from infra.telemetry.reader import read_run
from tests.infra.telemetry.support import delivered, fresh
from tests.kernel_launch import run

BIN = Path(sys.executable).parent
STEPS = 40


def _heat(tmp_path: Path, env: dict[str, str]) -> dict:
    u0 = np.random.default_rng(7).random((48, 32))
    np.save(tmp_path / "u0.npy", u0)
    out = tmp_path / "out"
    args = ["--ny", "48", "--nx", "32", "--steps", str(STEPS), "--alpha", "0.2",
            "--in", str(tmp_path / "u0.npy"), "--out", str(out)]
    result = run("heat", 2, args, env_extra={"NUMBA_CACHE_DIR": str(tmp_path / "nb"), **env},
                 timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("mode", ["kinesis", "apigateway"])
def test_heat_ranks_report_every_step_into_s3_and_show_reads_it(aws, tmp_path, mode):
    cfg, ep = fresh(aws)
    run_id = f"heat-{mode}-{os.getpid()}"
    env = {**telemetry_env(aws, run_id, mode=mode, cfg=cfg),
           "CLUSTERFLOW_TELEMETRY_MIN_SECONDS": "0"}  # a record per step
    assert ("CLUSTERFLOW_TELEMETRY_STREAM" in env) == (mode == "kinesis")
    manifest = _heat(tmp_path, env)
    tele = manifest["telemetry"]
    assert tele["transport"] == mode and tele["sent"] == 2 * STEPS and tele["dropped"] == 0

    got = delivered(aws, ep.bucket, f"telemetry/run_id={run_id}/", 2 * STEPS)
    assert sorted((r["rank"], r["step"]) for r in got) == [
        (rank, step) for rank in (0, 1) for step in range(1, STEPS + 1)]
    assert all(r["bytes"] > 0 and r["rss_bytes"] > 0 and r["seconds"] > 0 for r in got)

    summary, _ = read_run(aws, ep.bucket, run_id)
    assert summary.registered and [r.steps for r in summary.ranks] == [STEPS, STEPS]
    assert summary.load_imbalance >= 1.0
    cli_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    cli_env.update(AWS_ENDPOINT_URL=aws.endpoint_url, AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", CLUSTERFLOW_HOME=str(tmp_path / "h"))
    show = subprocess.run([str(BIN / "clusterflow"), "telemetry", "show", run_id, "--bucket",
                           ep.bucket], env=cli_env, capture_output=True, text=True, timeout=120)
    assert show.returncode == 0, show.stderr
    assert "load imbalance" in show.stdout and "slowest step" in show.stdout


def test_down_endpoint_does_not_fail_the_job_and_the_manifest_counts_the_drops(tmp_path):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    manifest = _heat(tmp_path, {"CLUSTERFLOW_RUN_ID": "down", "CLUSTERFLOW_TELEMETRY_URL": dead,
                                "CLUSTERFLOW_TELEMETRY_API_KEY": "k",
                                "CLUSTERFLOW_TELEMETRY_MIN_SECONDS": "0"})
    tele = manifest["telemetry"]
    assert tele["sent"] == 0 and tele["dropped"] == 2 * STEPS, tele
    assert tele["dropped_by_reason"]["dropped_send_failed"] == 2 * STEPS
    assert "Connection refused" in tele["last_error"] or "URLError" in tele["last_error"]
    assert np.load(tmp_path / "out" / "field.npy").shape == (48, 32)


def test_by_default_a_record_covers_a_block_of_steps_and_every_step_counts(aws, tmp_path):
    cfg, ep = fresh(aws)
    env = telemetry_env(aws, "blocks", mode="kinesis", cfg=cfg)
    # 40 steps of >= 10 ms: >= 0.4 s per rank, so blocks of >= 0.2 s make a few records
    manifest = _heat(tmp_path, {**env, "CLUSTERFLOW_STEP_DELAY_SECONDS": "0.01"})
    sent = manifest["telemetry"]["sent"]
    assert 2 <= sent < 2 * STEPS and manifest["telemetry"]["dropped"] == 0
    got = delivered(aws, ep.bucket, "telemetry/run_id=blocks/", sent)
    assert len(got) == sent and {r["step"] for r in got if r["steps"] > 1}
    summary, _ = read_run(aws, ep.bucket, "blocks")
    assert [(r.steps, r.last_step) for r in summary.ranks] == [(STEPS, STEPS)] * 2
    assert all(r.seconds >= 0.01 * STEPS for r in summary.ranks)  # the delays are in it


def test_without_telemetry_env_the_manifest_says_none(tmp_path):
    assert _heat(tmp_path, {})["telemetry"] is None
