"""`clusterflow run` refuses what cannot work with exit 2 and one line naming the field, before
anything exists: no bucket or queue on the endpoint, no run directory, no Prefect.

The runs get a Prefect API URL where nothing listens: a spec that got past the checks would fail
there with exit 1, so exit 2 also proves Prefect was never reached.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.spec import DEFAULT_SPEC
from infra.aws.clients import AwsTarget
from infra.aws.embedded import _free_port
from tests.conftest import run_cli


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{_free_port()}/api",
               CLUSTERFLOW_HOME=str(tmp_path / "home"), **extra)
    return env


def _spec(tmp_path: Path, change: dict[str, Any]) -> Path:
    doc = yaml.safe_load(DEFAULT_SPEC.read_text())
    doc["storage"] = {"input_bucket": "refused-inputs", "results_bucket": "refused-results"}
    for key, value in change.items():
        if key == "parameters":
            doc["kernel"]["parameters"].update(value)
        else:
            doc[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _created(aws: AwsTarget) -> tuple[set[str], set[str]]:
    buckets = {b["Name"] for b in aws.client("s3").list_buckets()["Buckets"]}
    queues = set(aws.client("sqs").list_queues().get("QueueUrls", []))
    return buckets, queues


@pytest.mark.parametrize(("change", "expected"), [
    ({"ranks": 4096}, ["ranks: 4096 ranks on the local backend", "cores", "oversubscribe"]),
    ({"parameters": {"nx": 65536, "ny": 65536, "nz": 65536, "alpha": 0.1}},
     ["kernel.parameters: heat on 2 ranks needs about", "PiB of memory",
      "nx=65536, ny=65536, nz=65536", "available"]),
    ({"storage": {"input_bucket": "192.168.5.4", "results_bucket": "refused-results"}},
     ["storage.input_bucket", "'192.168.5.4'", "IP address"]),
    ({"region": "us-east-9"}, ["region", "'us-east-9'", "allow_unlisted_region"]),
    ({"region": "moon"}, ["region", "'moon' is not an AWS region name"]),
    ({"scratch_dir": "/"}, ["scratch_dir", "system directory /"]),
    ({"parameters": {"steps": True}}, ["kernel.parameters.steps", "valid integer"]),
])
def test_refused_before_anything_is_created(aws, tmp_path, change, expected):
    spec = _spec(tmp_path, change)
    before = _created(aws)
    proc = run_cli(["run", "--spec", str(spec)], _env(tmp_path, AWS_ENDPOINT_URL=aws.endpoint_url),
                   tmp_path, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: pipeline spec ") and len(lines) <= 2  # one problem
    assert _created(aws) == before
    assert not (tmp_path / ".clusterflow").exists()
    assert not [d for d in os.listdir("/") if d.startswith("heat-demo")]  # no run dir at /


def test_aws_real_without_credentials_is_refused_before_prefect(tmp_path):
    spec = _spec(tmp_path, {"aws": "real"})
    missing = tmp_path / "no-such-file"
    env = _env(tmp_path, AWS_SHARED_CREDENTIALS_FILE=str(missing), AWS_CONFIG_FILE=str(missing),
               AWS_EC2_METADATA_DISABLED="true")
    proc = run_cli(["run", "--spec", str(spec)], env, tmp_path, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "aws: real needs AWS credentials" in proc.stderr
    assert "Traceback" not in proc.stderr and "prefect" not in proc.stderr.lower()
    assert not (tmp_path / ".clusterflow").exists()



def _one_step_on_the_cluster(aws: AwsTarget, tmp_path: Path, **spec: Any) -> Path:
    """A local spec whose sweep step alone runs on parallelcluster, clusterflow elsewhere
    (scratch_dir is not the cluster's remote_root)."""
    from tests.flows.test_fsx_steps import steps_world

    world = steps_world(aws, tmp_path)
    raw = yaml.safe_load(world.spec_path.read_text())
    raw["backend"] = "local"
    raw["steps"][0]["backend"] = "parallelcluster"
    raw.update(spec)
    world.spec_path.write_text(yaml.safe_dump(raw))
    return world.spec_path


@pytest.mark.parametrize(("change", "expected"), [
    # it could stage through FSx, but the fan-in would run on this machine, without the files
    ({}, ["steps.total (backend: local at the top of the spec): a run staged through the "
          "cluster's FSx runs every step on parallelcluster", "set backend: parallelcluster "
          "for this step", "scratch_dir equal to parallelcluster.remote_root"]),
    # the results bucket is under none of the file system's links: it cannot stage at all
    ({"results_bucket": "unlinked-results"},
     ["steps.sim run(s) on parallelcluster, but scratch_dir", "is not the cluster's shared "
      "storage parallelcluster.remote_root", "cannot stage through FSx", "unlinked-results"]),
    # no parallelcluster: section at all
    ({"parallelcluster": None},
     ["steps.sim.backend 'parallelcluster' needs a 'parallelcluster:' section"]),
])
def test_one_step_on_parallelcluster_is_checked_like_a_parallelcluster_spec(
        aws, tmp_path, change, expected):
    spec = _one_step_on_the_cluster(aws, tmp_path)
    raw = yaml.safe_load(spec.read_text())
    if "results_bucket" in change:
        raw["storage"]["results_bucket"] = change["results_bucket"]
    elif "parallelcluster" in change:
        del raw["parallelcluster"]
    spec.write_text(yaml.safe_dump(raw))
    before = _created(aws)
    proc = run_cli(["run", "--spec", str(spec)], _env(tmp_path, AWS_ENDPOINT_URL=aws.endpoint_url),
                   tmp_path, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: pipeline spec ") and len(lines) <= 2  # one problem
    assert _created(aws) == before
    assert not (tmp_path / ".clusterflow").exists() and not (tmp_path / "local").exists()
