"""A spec's ``budget:``: refused up front (nothing created), stopped by the watchdog."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from flows.budget import budget_watch
from flows.spec import load_spec
from flows.watchdog import BudgetExceeded, Watchdog
from infra.backends.providers.base import JobState
from infra.backends.providers.local import LocalProvider
from tests.aws_lists import rule_names, topic_arns
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
PC_OD = REPO / "cluster_configs" / "efa-ondemand-us-east-2.yaml"


def _write(tmp_path: Path, tag: str, body: dict) -> Path:
    body = {"name": f"budget-{tag}",
            "storage": {"input_bucket": f"budget-{tag}-in", "results_bucket": f"budget-{tag}-out"},
            "fanout": {"topic": f"budget-{tag}-topic", "queues": [f"budget-{tag}-q"]}, **body}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _nothing_named(aws, tag: str) -> None:
    buckets = [b["Name"] for b in aws.client("s3").list_buckets().get("Buckets", [])]
    assert not [b for b in buckets if b.startswith(f"budget-{tag}")]
    topics = topic_arns(aws)
    assert not [t for t in topics if f"budget-{tag}" in t]
    queues = aws.client("sqs").list_queues(QueueNamePrefix=f"budget-{tag}").get("QueueUrls", [])
    assert queues == []
    rules = rule_names(aws, f"budget-{tag}")
    assert rules == []


def test_a_run_over_its_budget_is_refused_and_creates_nothing(aws, cli_env, tmp_path):
    # 256 ranks on hpc7a.96xlarge: 3 sweep points x 2 nodes x 0.5 h x 7.20 USD alone is 21.60.
    spec = _write(tmp_path, "pc", {
        "backend": "parallelcluster", "ranks": 256, "scratch_dir": "/fsx/clusterflow",
        "parallelcluster": {"config": str(PC_OD), "cluster_name": "cf-budget"},
        "budget": {"max_usd": 5},
        "steps": [{"name": "simulate", "uses": "heat", "timeout": 1800,
                   "sweep": {"alpha": [0.05, 0.1, 0.2], "max_parallel": 2}}]})
    env = {**cli_env, "AWS_ENDPOINT_URL": aws.endpoint_url}
    got = run_cli(["run", "--spec", str(spec)], env, tmp_path)
    assert got.returncode == 2, got.stderr
    assert "exceeds budget.max_usd (5 USD); nothing was created" in got.stderr
    assert "Traceback" not in got.stderr
    _nothing_named(aws, "pc")


def test_the_stand_in_rate_refuses_a_local_run_too(aws, cli_env, tmp_path):
    # 60 USD/h for the whole run x the step's 1 h limit = 60 USD > 10.
    spec = _write(tmp_path, "local", {
        "budget": {"max_usd": 10, "hourly_usd": 60},
        "steps": [{"name": "wait", "command": ["sleep", "1"], "launcher": "none",
                   "ranks": 1, "timeout": 3600}]})
    env = {**cli_env, "AWS_ENDPOINT_URL": aws.endpoint_url}
    got = run_cli(["run", "--spec", str(spec)], env, tmp_path)
    assert got.returncode == 2, got.stderr
    assert "estimate of 60.00 USD exceeds budget.max_usd (10 USD)" in got.stderr
    _nothing_named(aws, "local")


def test_the_watchdog_cancels_the_job_and_fails_the_run(aws, cli_env, tmp_path):
    # No time limit, so no up-front bound: 360 USD/h is 0.1 USD/s, so the watchdog trips
    # 5 s into the run (1.5 s of provisioning included), long before `sleep 117` ends.
    spec = _write(tmp_path, "dog", {
        "budget": {"max_usd": 0.5, "hourly_usd": 360, "check_seconds": 0.2},
        "steps": [{"name": "wait", "command": ["sleep", "117"], "launcher": "none",
                   "ranks": 1}]})
    env = {**cli_env, "AWS_ENDPOINT_URL": aws.endpoint_url}
    t0 = time.monotonic()
    got = run_cli(["run", "--spec", str(spec)], env, tmp_path)
    took = time.monotonic() - t0
    assert got.returncode == 1, got.stdout + got.stderr
    assert "budget exceeded" in got.stderr and "passed budget.max_usd (0.5 USD)" in got.stderr
    assert took < 90, took
    left = subprocess.run(["pgrep", "-f", "sleep 117"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "the job outlived the watchdog"


def test_watchdog_tears_down_and_refuses_new_jobs(tmp_path):
    torn: list[str] = []
    dog = Watchdog(1.0, 3600 * 100, interval=0.05, teardown=[lambda: torn.append("cluster")])
    provider = LocalProvider()
    job = provider.submit(["sleep", "30"], ranks=1, job_name="sleep", workdir=tmp_path)
    dog.jobs.append((provider, job))
    dog.start()
    deadline = time.monotonic() + 10
    while not dog.tripped and time.monotonic() < deadline:
        time.sleep(0.05)
    dog.stop()
    assert dog.tripped and torn == ["cluster"]
    assert provider.status(job).state is not JobState.RUNNING
    assert "budget exceeded" in dog.message


def test_budget_watch_turns_a_tripped_block_into_budget_exceeded(aws, tmp_path):
    spec_path = _write(tmp_path, "watch", {"budget": {"max_usd": 0.001, "hourly_usd": 3600,
                                                      "check_seconds": 0.05}})
    spec = load_spec(spec_path)
    with pytest.raises(BudgetExceeded, match="budget exceeded"), \
            budget_watch(spec, spec_path, aws, log=lambda _: None) as dog:
        assert dog is not None
        time.sleep(1.0)


@pytest.fixture(scope="module")
def batch_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """The embedded endpoint with the placement-group extension that Batch provisioning needs."""
    from infra.aws.clients import AwsTarget
    from tests.infra.clusters.test_batch import start_server

    server = start_server(tmp_path_factory.mktemp("moto-budget") / "moto.log")
    yield AwsTarget(region="us-east-1", endpoint_url=server.url, embedded=True)
    server.stop()


def test_the_watchdog_removes_a_batch_environment_whatever_teardown_says(batch_endpoint,
                                                                        tmp_path):
    from infra.clusters import batch
    from infra.clusters.batch_config import load_batch_config
    from tests.infra.clusters.test_batch import NOTHING, created, network, raw_config

    raw = raw_config(network(batch_endpoint))
    config = tmp_path / "batch.yaml"
    config.write_text(yaml.safe_dump(raw))
    spec_path = _write(tmp_path, "batch", {
        "backend": "batch", "ranks": 72, "batch": {"config": str(config), "teardown": "never"},
        "budget": {"max_usd": 0.001, "hourly_usd": 3600, "check_seconds": 0.05}})
    spec = load_spec(spec_path)
    cfg = load_batch_config(config)
    batch.ensure_environment(batch_endpoint, cfg)
    assert created(batch_endpoint, cfg) != NOTHING
    with pytest.raises(BudgetExceeded, match="torn down"), \
            budget_watch(spec, spec_path, batch_endpoint, log=lambda _: None):
        deadline = time.monotonic() + 60
        while created(batch_endpoint, cfg) != NOTHING and time.monotonic() < deadline:
            time.sleep(0.2)
    assert created(batch_endpoint, cfg) == NOTHING


def test_the_watchdog_cancels_every_element_of_a_sweeps_job_array(tmp_path):
    """Job arrays are submitted apart from ``submit``: their elements must be known too."""
    from flows.watchdog import _active, guard
    from infra.backends.providers.slurm import ArrayItem, SlurmProvider
    from tests.slurm_fixtures import ensure_local_slurm

    ensure_local_slurm()
    dog = Watchdog(1.0, 3600 * 100, interval=3600)
    token = _active.set(dog)
    try:
        provider = guard(SlurmProvider())
    finally:
        _active.reset(token)
    items = [ArrayItem(i, ["sleep", "60"], tmp_path, {}) for i in (0, 1)]
    handles = provider.submit_array(items, ranks=1, job_name="sleepy", workdir=tmp_path,
                                    max_parallel=2)
    assert [j for _, j in dog.jobs] == handles
    dog.trip()
    assert all(provider.status(h).state is JobState.CANCELLED for h in handles)
    with pytest.raises(BudgetExceeded):
        provider.submit_array(items, ranks=1, job_name="again", workdir=tmp_path,
                              max_parallel=2)
