"""``clusterflow run --dry-run``: read-only checks against an account, nothing created."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.aws_lists import topic_arns
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]


def _spec(tmp_path: Path, tag: str, **body: object) -> Path:
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"dry-{tag}",
        "storage": {"input_bucket": f"dry-{tag}-in", "results_bucket": f"dry-{tag}-out"},
        "fanout": {"topic": f"dry-{tag}-topic", "queues": [f"dry-{tag}-q"]}, **body}))
    return path


def _env(cli_env: dict[str, str], aws) -> dict[str, str]:
    return {**cli_env, "AWS_ENDPOINT_URL": aws.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing"}


def _created(aws, tag: str) -> list[str]:
    names = [b["Name"] for b in aws.client("s3").list_buckets().get("Buckets", [])]
    names += aws.client("sqs").list_queues(QueueNamePrefix=f"dry-{tag}").get("QueueUrls", [])
    names += topic_arns(aws)
    return [n for n in names if f"dry-{tag}" in n]


def test_dry_run_checks_the_account_and_creates_nothing(aws, cli_env, tmp_path):
    spec = _spec(tmp_path, "local")
    got = run_cli(["run", "--spec", str(spec), "--aws", "real", "--dry-run", "--json"],
                  _env(cli_env, aws), tmp_path)
    assert got.returncode == 0, got.stderr
    report = json.loads(got.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["credentials"]["result"] == "ok"
    assert "account 123456789012" in checks["credentials"]["detail"]
    assert checks["resources"]["detail"] == "6 resources, create 6"
    assert checks["iam policy simulation"]["result"] in ("ok", "unchecked")
    assert _created(aws, "local") == []


def test_dry_run_reports_what_the_account_lacks(aws, cli_env, tmp_path):
    spec = _spec(tmp_path, "pc", backend="parallelcluster", scratch_dir="/fsx/clusterflow",
                 parallelcluster={"config": str(REPO / "cluster_configs/efa-ondemand-us-east-2"
                                                         ".yaml"), "cluster_name": "cf-dry"})
    got = run_cli(["run", "--spec", str(spec), "--aws", "real", "--dry-run"],
                  _env(cli_env, aws), tmp_path)
    assert got.returncode == 1, got.stdout + got.stderr
    assert "dry run (nothing was created)" in got.stdout
    assert "failed    parallelcluster account look-ups" in got.stdout
    assert "subnet 'subnet-0a1b2c3d4e5f60001' does not exist in us-east-2" in got.stdout
    assert _created(aws, "pc") == []


def test_dry_run_needs_an_account(cli_env, tmp_path):
    got = run_cli(["run", "--spec", str(_spec(tmp_path, "none")), "--dry-run"], cli_env,
                  tmp_path)
    assert got.returncode == 2 and "--dry-run checks an account" in got.stderr
