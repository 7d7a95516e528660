"""``clusterflow plan``: resources with create/reuse/delete, and costs checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.budget import run_estimate
from flows.planning.resources import inventory
from flows.spec import load_spec
from infra.clusters.prices import PriceError, load_prices
from tests.aws_lists import topic_arns
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
PC_OD = REPO / "cluster_configs" / "efa-ondemand-us-east-2.yaml"
PC_SPOT = REPO / "cluster_configs" / "efa-spot-us-east-1.yaml"
BATCH_CPU = REPO / "cluster_configs" / "batch" / "mnp-c5n-efa.yaml"
BATCH_GPU = REPO / "cluster_configs" / "batch" / "mnp-p4d-efa.yaml"
MONTH = 730  # hours per month in the shipped table


def _write(tmp_path: Path, body: dict, name: str = "spec.yaml") -> Path:
    body = {"name": "plan-test", "storage": {"input_bucket": "plan-in-bucket",
                                             "results_bucket": "plan-out-bucket"}, **body}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def _pc(config: Path, **extra: object) -> dict:
    return {"backend": "parallelcluster", "scratch_dir": "/fsx/clusterflow",
            "parallelcluster": {"config": str(config), "cluster_name": "cf-plan", **extra}}


def _sweep_steps() -> list[dict]:
    return [
        {"name": "simulate", "uses": "heat", "parameters": {"steps": 100}, "timeout": 1800,
         "sweep": {"alpha": [0.05, 0.1, 0.2], "max_parallel": 2}},
        {"name": "analyse", "command": ["python3", "-c", "print(1)"], "launcher": "none",
         "ranks": 1, "timeout": 600},
    ]


def _estimate(path: Path) -> dict:
    return run_estimate(load_spec(path), path).as_dict()


def test_sweep_on_the_on_demand_parallelcluster_config_by_hand(tmp_path):
    spec = _write(tmp_path, {**_pc(PC_OD), "ranks": 256, "steps": _sweep_steps()})
    est = _estimate(spec)
    # simulate: 256 ranks / 192 vCPUs of hpc7a.96xlarge = 2 nodes; 3 points x 0.5 h at 7.20
    # analyse: 1 node x 1/6 h. Wall: ceil(3 / 2) x 0.5 + 1/6 h; head node and storage are
    # billed for wall + 0.25 h of cluster creation.
    wall = 2 * 0.5 + 600 / 3600
    billed = wall + 0.25
    simulate = 3 * 2 * 0.5 * 7.20
    analyse = 1 * 1 * (600 / 3600) * 7.20
    head = billed * 0.34
    fsx = billed * 1200 * 0.21 / MONTH  # PERSISTENT_2 at 250 MB/s/TiB
    ebs = billed * 200 * 0.08 / MONTH  # gp3
    by_item = {ln["item"]: ln for ln in est["lines"]}
    assert by_item["step simulate"]["nodes"] == 2
    assert by_item["step simulate"]["instance_type"] == "hpc7a.96xlarge"
    assert by_item["step simulate"]["usd"] == pytest.approx(simulate)
    assert by_item["step analyse"]["usd"] == pytest.approx(analyse, abs=1e-4)
    assert by_item["head node (cf-plan)"]["usd"] == pytest.approx(head, abs=1e-4)
    assert est["wall_hours"] == pytest.approx(wall)
    assert est["usd"] == pytest.approx(simulate + analyse + head + fsx + ebs, abs=1e-3)
    # The watchdog's rate: 2 points at once x 2 nodes, plus head node and storage.
    assert est["usd_per_hour"] == pytest.approx(
        2 * 2 * 7.20 + 0.34 + (1200 * 0.21 + 200 * 0.08) / MONTH, abs=1e-3)
    assert est["prices_as_of"] == "2025-05"


def test_spot_config_prices_the_dearest_compute_resource_on_spot(tmp_path):
    spec = _write(tmp_path, {**_pc(PC_SPOT), "ranks": 144,
                             "kernel": {"name": "heat", "retries": 1},
                             "slurm": {"time_limit": "1:30:00"}})
    est = _estimate(spec)
    # cpu-spot: c6in.32xlarge (128 vCPUs -> 2 nodes x 2.61) vs c5n.18xlarge (72 -> 2 x 1.40):
    # the dearest is c6in. 1.5 h from slurm.time_limit, x 2 attempts (retries: 1).
    job = est["lines"][0]
    assert (job["instance_type"], job["nodes"], job["hours"]) == ("c6in.32xlarge", 2, 3.0)
    assert job["usd"] == pytest.approx(2 * 3.0 * 2.61)
    assert job["usd_on_demand"] == pytest.approx(2 * 3.0 * 7.2576)
    billed = 3.0 + 0.25
    fixed = billed * (0.17 + 1200 * 0.14 / MONTH + 100 * 0.08 / MONTH)  # c6i.xlarge, SCRATCH_2
    assert est["usd"] == pytest.approx(2 * 3.0 * 2.61 + fixed, abs=1e-3)
    assert any("dearest" in a for a in est["assumptions"])


@pytest.mark.parametrize("config,itype,ranks,nodes,rate", [
    (BATCH_CPU, "c5n.18xlarge", 100, 3, 3.888),   # 36 ranks per node
    (BATCH_GPU, "p4d.24xlarge", 16, 2, 32.7726),  # 8 ranks per node
])
def test_batch_configs_by_hand(tmp_path, config, itype, ranks, nodes, rate):
    cfg = yaml.safe_load(config.read_text())
    spec = _write(tmp_path, {"backend": "batch", "ranks": ranks, "batch": {"config": str(config)},
                             "steps": [{"name": "job", "uses": "heat", "timeout": 5400,
                                        "parameters": {"nx": 256, "ny": 256}}]})
    est = _estimate(spec)
    (job,) = est["lines"]
    assert (job["instance_type"], job["nodes"]) == (itype, nodes)
    assert est["usd"] == pytest.approx(nodes * 1.5 * rate)
    assert cfg["instance_type"] == itype


def test_batch_timeout_minutes_bounds_a_step_without_its_own(tmp_path):
    spec = _write(tmp_path, {"backend": "batch", "ranks": 72,
                             "batch": {"config": str(BATCH_CPU)}})
    est = _estimate(spec)
    assert est["lines"][0]["hours"] == 2.0  # timeout_minutes: 120
    assert est["usd"] == pytest.approx(2 * 2.0 * 3.888)


def test_no_time_limit_leaves_the_cost_unbounded_and_says_what_to_set(tmp_path):
    spec = _write(tmp_path, {**_pc(PC_OD), "ranks": 8})
    est = _estimate(spec)
    assert est["usd"] is None and est["wall_hours"] is None
    assert "set steps.heat.timeout (seconds) or slurm.time_limit" in est["unknown"][0]


def test_local_runs_cost_nothing(tmp_path):
    est = _estimate(_write(tmp_path, {"steps": _sweep_steps()}))
    assert est["usd"] == 0.0 and est["unknown"] == []


def test_prices_override_and_a_missing_price(tmp_path):
    table = json.loads((REPO / "infra/clusters/data/prices.json").read_text())
    table["regions"]["us-east-1"]["instances"]["c5n.18xlarge"]["on_demand"] = 1.0
    mine = tmp_path / "prices.json"
    mine.write_text(json.dumps(table))
    spec = _write(tmp_path, {"backend": "batch", "ranks": 72, "batch": {"config": str(BATCH_CPU)}})
    assert run_estimate(load_spec(spec), spec, mine).usd == pytest.approx(2 * 2.0 * 1.0)
    del table["regions"]["us-east-1"]["instances"]["c5n.18xlarge"]
    mine.write_text(json.dumps(table))
    est = run_estimate(load_spec(spec), spec, mine)
    assert est.usd is None and "no price for c5n.18xlarge in us-east-1" in est.unpriced[0]
    mine.write_text("{}")
    with pytest.raises(PriceError, match="as_of"):
        load_prices(mine)


def test_every_shipped_instance_type_has_a_price():
    prices = load_prices()
    for path in [PC_OD, PC_SPOT]:
        raw = yaml.safe_load(path.read_text())
        types = [raw["HeadNode"]["InstanceType"]] + [
            cr["InstanceType"] for q in raw["Scheduling"]["SlurmQueues"]
            for cr in q["ComputeResources"]]
        for t in types:
            assert prices.instance_hour(raw["Region"], t)[0] > 0
    for path in [BATCH_CPU, BATCH_GPU]:
        raw = yaml.safe_load(path.read_text())
        assert prices.instance_hour(raw["region"], raw["instance_type"])[0] > 0


def test_inventory_reports_reuse_truthfully_against_the_endpoint(aws, tmp_path):
    spec_path = _write(tmp_path, {"storage": {"input_bucket": "plan-reuse-in",
                                              "results_bucket": "plan-reuse-out"},
                                  "fanout": {"topic": "plan-reuse-topic",
                                             "queues": ["plan-reuse-q"]}})
    spec = load_spec(spec_path)
    aws.client("s3").create_bucket(Bucket="plan-reuse-in")
    aws.client("sqs").create_queue(QueueName="plan-reuse-q")
    got = {(r.kind, r.name): r.action for r in inventory(spec, aws)}
    assert got[("s3 bucket", "plan-reuse-in")] == "reuse"
    assert got[("s3 bucket", "plan-reuse-out")] == "create"
    assert got[("sns topic", "plan-reuse-topic")] == "create"
    assert got[("sqs queue", "plan-reuse-q")] == "reuse"
    assert got[("sqs queue", "plan-reuse-q-dlq")] == "create"
    topics = topic_arns(aws)
    assert not any(t.endswith(":plan-reuse-topic") for t in topics)  # the plan created nothing
    offline = inventory(spec, None, "not checked (--offline)")
    assert {r.action for r in offline} == {"unchecked"}


def test_inventory_of_a_batch_environment_on_the_endpoint(aws, tmp_path):
    spec = load_spec(_write(tmp_path, {"backend": "batch", "ranks": 72,
                                       "batch": {"config": str(BATCH_CPU),
                                                 "teardown": "after_run"}}))
    aws.client("ec2").create_placement_group(GroupName="clusterflow-mnp-pg", Strategy="cluster")
    try:
        got = {r.kind: r for r in inventory(spec, aws)}
    finally:
        aws.client("ec2").delete_placement_group(GroupName="clusterflow-mnp-pg")
    assert got["ec2 placement group"].action == "reuse"
    for kind in ("ec2 launch template", "batch compute environment", "batch job queue",
                 "batch job definition"):
        assert got[kind].action == "create", (kind, got[kind])
        assert got[kind].at_end == "deleted"


def test_plan_cli_text_and_json(cli_env, tmp_path):
    spec = _write(tmp_path, {**_pc(PC_OD), "ranks": 256, "steps": _sweep_steps(),
                             "budget": {"max_usd": 20}})
    text = run_cli(["plan", str(spec), "--offline"], cli_env, tmp_path)
    assert text.returncode == 0, text.stderr
    assert "not checked (--offline)" in text.stdout
    assert "estimate 23.80 USD" in text.stdout
    assert "budget 20 USD: the run would be refused" in text.stdout
    js = run_cli(["plan", str(spec), "--json"], cli_env, tmp_path)
    assert js.returncode == 0, js.stderr
    plan = json.loads(js.stdout)
    assert plan["checked"] and plan["budget"] == {"max_usd": 20.0, "fits": False}
    actions = {(r["kind"], r["action"], r["at_end"]) for r in plan["resources"]}
    assert ("fsx lustre file system", "create", "deleted") in actions
    assert ("ebs volume", "create", "snapshot") in actions
    assert ("fsx data repository association", "create", "deleted") in actions
    bad = run_cli(["plan", str(tmp_path / "missing.yaml")], cli_env, tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_inventory_asks_parallelcluster_whether_the_cluster_exists(aws, tmp_path):
    spec = load_spec(_write(tmp_path, {**_pc(PC_OD, teardown="never"), "ranks": 8}))
    got = {r.kind: r for r in inventory(spec, aws)}
    assert got["parallelcluster cluster"].action == "create"  # pcluster: no such cluster
    assert got["parallelcluster cluster"].at_end == "kept"  # teardown: never
    assert got["fsx lustre file system"].at_end == "kept"


def test_a_staged_steps_run_plans_the_file_system_it_stages_through(tmp_path):
    """Run from elsewhere (scratch_dir is not remote_root), a steps: sweep stages through the
    config's FSx: the plan says so on the file system, beside its associations."""
    body = {**_pc(PC_OD), "ranks": 256, "steps": _sweep_steps(),
            "scratch_dir": str(tmp_path / "scratch"),
            "storage": {"input_bucket": "clusterflow-demo-inputs",
                        "results_bucket": "clusterflow-demo-results"}}
    staged = {r.kind: r for r in inventory(load_spec(_write(tmp_path, body)), None)}
    fs = staged["fsx lustre file system"]
    assert "the run stages through it: import tasks" in fs.note
    assert "an export task per result folder, verified in S3 by sha256" in fs.note
    assert "fsx data repository association" in staged
    body["scratch_dir"] = "/fsx/clusterflow"  # on the head node: the mount is shared
    shared = {r.kind: r for r in inventory(load_spec(_write(tmp_path, body)), None)}
    assert "stages through it" not in shared["fsx lustre file system"].note
