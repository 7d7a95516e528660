"""`clusterflow run` with CLUSTERFLOW_TELEMETRY set: the pipeline wires the job's ranks in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from flows.spec import DEFAULT_SPEC
from infra.telemetry.provision import TelemetryConfig, TelemetrySetupError, ensure_telemetry
from tests.conftest import run_cli
from tests.infra.telemetry.support import delivered


def test_pipeline_run_reports_through_the_api_and_show_reads_it(aws, cli_env, tmp_path):
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec["kernel"]["parameters"] = {"nx": 45, "ny": 31, "steps": 25, "alpha": 0.2}
    spec["storage"] = {"input_bucket": "tele-e2e-in", "results_bucket": "tele-e2e-out",
                       "input_prefix": "inputs/", "results_prefix": "runs/"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cli_env.update(AWS_ENDPOINT_URL=aws.endpoint_url, CLUSTERFLOW_TELEMETRY="apigateway",
                   CLUSTERFLOW_TELEMETRY_BUFFER_SECONDS="1",
                   CLUSTERFLOW_TELEMETRY_MIN_SECONDS="0")  # forwarded to the ranks
    proc = run_cli(["run", "--spec", str(tmp_path / "spec.yaml"), "--json"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads(proc.stdout)["run_id"]
    manifest = json.loads(aws.client("s3").get_object(
        Bucket="tele-e2e-out", Key=f"runs/{run_id}/manifest.json")["Body"].read())
    assert manifest["telemetry"]["transport"] == "apigateway"
    assert manifest["telemetry"]["sent"] == 2 * 25 and manifest["telemetry"]["dropped"] == 0

    assert len(delivered(aws, "tele-e2e-out", f"telemetry/run_id={run_id}/", 50)) == 50
    show = run_cli(["telemetry", "show", run_id, "--bucket", "tele-e2e-out", "--json"],
                   cli_env, tmp_path)
    assert show.returncode == 0, show.stderr
    summary = json.loads(show.stdout)
    assert summary["registered"] is True
    assert [(r["rank"], r["steps"]) for r in summary["ranks"]] == [(0, 25), (1, 25)]

    # The on-result flow attaches the same picture to the run, next to its manifest.
    code = ("import json, sys; from flows.postprocess import postprocess; "
            "print(json.dumps(postprocess(key=sys.argv[1], spec_path=sys.argv[2])))")
    post = subprocess.run([sys.executable, "-c", code, f"runs/{run_id}/manifest.json",
                           str(tmp_path / "spec.yaml")], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert post.returncode == 0, post.stderr[-3000:]
    attached = json.loads(post.stdout.strip().splitlines()[-1])["telemetry"]
    assert attached["picture"] == f"s3://tele-e2e-out/runs/{run_id}/telemetry.png"
    assert attached["load_imbalance"] == summary["load_imbalance"]
    png = aws.client("s3").get_object(Bucket="tele-e2e-out",
                                      Key=f"runs/{run_id}/telemetry.png")["Body"].read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_delivery_stream_of_another_bucket_is_refused(aws):
    cfg = TelemetryConfig.for_bucket("tele-owner-a")
    ensure_telemetry(aws, cfg)
    with pytest.raises(TelemetrySetupError, match="delivers to bucket 'tele-owner-a'"):
        ensure_telemetry(aws, cfg.model_copy(update={"bucket": "tele-owner-b"}))
