"""ParallelCluster and Batch configs: the shipped ones validate, broken ones are refused with the
exact field paths, and each of clusterflow's own checks catches what it is there for."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from infra.aws.clients import AwsTarget
from infra.clusters import instance_types
from infra.clusters.batch_config import validate_batch_config
from infra.clusters.config_issues import ConfigInvalid, ConfigIssue, flatten_marshmallow
from infra.clusters.parallelcluster_validate import load_cluster_config, validate_cluster_config
from infra.clusters.validate_cli import register

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "cluster_configs"
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "cluster_configs"
SHIPPED_PC = sorted(CONFIGS.glob("*.yaml"))
SHIPPED_BATCH = sorted((CONFIGS / "batch").glob("*.yaml"))
Q0 = "Scheduling.SlurmQueues[0]"
CR00 = f"{Q0}.ComputeResources[0]"


def issues_of(exc: pytest.ExceptionInfo[ConfigInvalid]) -> list[tuple[str, str]]:
    return [(i.path, i.message) for i in exc.value.issues]


def paths_of(exc: pytest.ExceptionInfo[ConfigInvalid]) -> list[str]:
    return [i.path for i in exc.value.issues]


def ondemand() -> dict:
    return yaml.safe_load((CONFIGS / "efa-ondemand-us-east-2.yaml").read_text())


def validate(raw: dict, **kwargs: object) -> object:
    return validate_cluster_config(copy.deepcopy(raw), **kwargs)


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


def cli_app() -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.callback()
    def main() -> None:
        """clusterflow"""

    register(app)
    return app


# ------------------------------------------------------------------ shipped configs


def test_the_shipped_configs_cover_the_issue():
    assert len(SHIPPED_PC) >= 2 and len(SHIPPED_BATCH) >= 1
    loaded = [load_cluster_config(p) for p in SHIPPED_PC]
    queues = [q for c in loaded for q in c.raw["Scheduling"]["SlurmQueues"]]
    crs = [(q, cr) for q in queues for cr in q["ComputeResources"]]
    types = {cr["InstanceType"] for _, cr in crs}
    # a CPU queue with EFA + a cluster placement group, a GPU queue with EFA, both capacities
    assert types & {"hpc7a.96xlarge", "c6in.32xlarge", "c5n.18xlarge"}
    assert types & {"p5.48xlarge", "p4d.24xlarge"}
    assert all(cr["Efa"]["Enabled"] for _, cr in crs)
    assert all(q["Networking"]["PlacementGroup"]["Enabled"] for q in queues)
    assert {q["CapacityType"] for q in queues} == {"SPOT", "ONDEMAND"}
    storage = [s for c in loaded for s in c.raw["SharedStorage"]]
    fsx = {s["FsxLustreSettings"]["DeploymentType"]: s["FsxLustreSettings"] for s in storage
           if s["StorageType"] == "FsxLustre"}
    assert set(fsx) == {"PERSISTENT_2", "SCRATCH_2"}
    assert fsx["PERSISTENT_2"]["DataRepositoryAssociations"][0]["DataRepositoryPath"] \
        == "s3://clusterflow-demo-inputs"
    assert all(s["EbsSettings"]["DeletionPolicy"] == "Snapshot" for s in storage
               if s["StorageType"] == "Ebs")
    # hpc7a is not offered in us-east-1, so a config using it must be elsewhere
    for c in loaded:
        used = {cr["InstanceType"] for q in c.raw["Scheduling"]["SlurmQueues"]
                for cr in q["ComputeResources"]}
        assert not ("hpc7a.96xlarge" in used and c.region == "us-east-1")


@pytest.mark.parametrize("path", SHIPPED_PC + SHIPPED_BATCH, ids=lambda p: p.name)
def test_every_shipped_config_validates(cli, path):
    result = cli.invoke(cli_app(), ["validate", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{path}: ok - ")


# ------------------------------------------------------------------ broken fixtures


def test_schema_errors_come_with_exact_field_paths():
    with pytest.raises(ConfigInvalid) as exc:
        load_cluster_config(FIXTURES / "pc-schema-errors.yaml")
    assert sorted(issues_of(exc)) == sorted([
        ("Scheduling.Scheduler", "Must be one of: slurm."),
        (f"{CR00}.MaxCount", "Must be greater than or equal to 1."),
        (f"{CR00}.Efaa", "Unknown field."),
        ("SharedStorage[0].FsxLustreSettings.DeploymentType",
         "Must be one of: SCRATCH_1, SCRATCH_2, PERSISTENT_1, PERSISTENT_2."),
        ("SharedStorage[1].EbsSettings.DeletionPolicy",
         "Must be one of: Delete, Retain, Snapshot."),
    ])


def test_clusterflow_checks_find_what_the_schema_lets_through():
    with pytest.raises(ConfigInvalid) as exc:
        load_cluster_config(FIXTURES / "pc-check-errors.yaml")
    assert sorted(paths_of(exc)) == sorted([
        f"{CR00}.MaxCount",
        f"{CR00}.InstanceType",
        f"{Q0}.Networking.SubnetIds",
    ])
    messages = dict(issues_of(exc))
    assert "MaxCount (2) is less than MinCount (4)" in messages[f"{CR00}.MaxCount"]
    assert "'c6i.xlarge' does not support EFA" in messages[f"{CR00}.InstanceType"]
    # ParallelCluster has no GPU-queue error: a warning, carried with the errors
    assert [(w.path, "named like a GPU queue" in w.message) for w in exc.value.warnings] == [
        ("Scheduling.SlurmQueues[1].ComputeResources[0].InstanceType", True)]


def test_batch_limits_are_said_in_batchs_words():
    with pytest.raises(ConfigInvalid) as exc:
        validate_batch_config(yaml.safe_load((FIXTURES / "batch-errors.yaml").read_text()))
    messages = dict(issues_of(exc))
    assert set(messages) == {"instance_types", "capacity_type", "max_nodes"}
    assert "one instance type per job" in messages["instance_types"]
    assert "Spot" in messages["capacity_type"]
    assert "at most 1000 nodes" in messages["max_nodes"]


def test_cli_prints_every_error_with_its_path_and_exits_1(cli):
    files = [str(FIXTURES / "pc-schema-errors.yaml"), str(SHIPPED_PC[0]),
             str(FIXTURES / "pc-check-errors.yaml")]
    result = cli.invoke(cli_app(), ["validate", *files])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert f"{files[0]}: {CR00}.MaxCount: Must be greater than or equal to 1." in lines
    assert f"{files[0]}: {CR00}.Efaa: Unknown field." in lines
    assert any(ln.startswith(f"{files[1]}: ok - ParallelCluster config") for ln in lines)
    assert sum(ln.startswith(files[2]) for ln in lines) == 4  # 3 errors and a warning
    assert sum(ln.startswith(files[2]) and ": warning: " in ln for ln in lines) == 1
    assert lines[-1] == "8 error(s) in 2 of 3 file(s)"


def test_cli_json_output_and_unrecognised_files(cli, tmp_path):
    other = tmp_path / "batch" / "x.yaml"
    other.parent.mkdir()
    other.write_text("name: something\n")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    result = cli.invoke(cli_app(), ["validate", "--json", str(other), str(listing),
                                    str(SHIPPED_BATCH[0])])
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert [r["valid"] for r in out] == [False, False, True]
    assert out[0]["errors"][0]["path"] == "<root>"
    assert "kind: batch-mnp" in out[0]["errors"][0]["message"]
    assert out[1]["errors"] == [{"path": "<root>", "message": "expected a YAML mapping, got list"}]
    assert out[2]["kind"] == "batch" and "c5n.18xlarge" in out[2]["summary"]


# ------------------------------------------------------------------ each check on its own


def test_flatten_marshmallow_paths():
    nested = {"Scheduling": {"SlurmQueues": {0: {"ComputeResources": {1: {
        "MaxCount": ["Must be greater than or equal to 1."]}}}}},
        "SharedStorage": {0: {"FsxLustreSettings": {"_schema": ["a", "b"]}}},
        "Image": ["Missing data for required field."]}
    assert list(flatten_marshmallow(nested)) == [
        ConfigIssue("Scheduling.SlurmQueues[0].ComputeResources[1].MaxCount",
                    "Must be greater than or equal to 1."),
        ConfigIssue("SharedStorage[0].FsxLustreSettings", "a"),
        ConfigIssue("SharedStorage[0].FsxLustreSettings", "b"),
        ConfigIssue("Image", "Missing data for required field."),
    ]


def test_efa_on_a_type_without_efa_in_flexible_instances():
    raw = ondemand()
    cr = raw["Scheduling"]["SlurmQueues"][0]["ComputeResources"][0]
    del cr["InstanceType"]
    cr["Instances"] = [{"InstanceType": "c6i.32xlarge"}, {"InstanceType": "c6a.32xlarge"}]
    with pytest.raises(ConfigInvalid) as exc:
        validate(raw)
    assert paths_of(exc) == [f"{CR00}.Instances[1].InstanceType"]  # c6i.32xlarge has EFA


def test_flexible_instance_types_need_the_same_vcpu_count():
    raw = ondemand()
    cr = raw["Scheduling"]["SlurmQueues"][0]["ComputeResources"][0]
    del cr["InstanceType"]
    cr["Instances"] = [{"InstanceType": "c6in.32xlarge"}, {"InstanceType": "c5n.18xlarge"}]
    with pytest.raises(ConfigInvalid) as exc:
        validate(raw)
    assert issues_of(exc) == [(f"{CR00}.Instances", (
        "the instance types of one compute resource must have the same number of vCPUs "
        "(c6in.32xlarge: 128, c5n.18xlarge: 72): split them into separate compute resources"))]


def test_efa_needs_an_explicit_placement_group_setting():
    raw = ondemand()
    del raw["Scheduling"]["SlurmQueues"][0]["Networking"]["PlacementGroup"]
    with pytest.raises(ConfigInvalid) as exc:
        validate(raw)
    assert paths_of(exc) == [f"{CR00}.Efa.Enabled"]
    raw["Scheduling"]["SlurmQueues"][0]["Networking"]["PlacementGroup"] = {"Enabled": False}
    validate(raw)  # an explicit opt-out is fine, as in ParallelCluster


def test_subnets_in_several_azs_with_a_placement_group():
    raw = ondemand()
    q = raw["Scheduling"]["SlurmQueues"][0]
    q["ComputeResources"][0]["Efa"]["Enabled"] = False
    q["Networking"]["SubnetIds"] = ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60009"]
    with pytest.raises(ConfigInvalid) as exc:  # offline: the documented rule
        validate(raw)
    assert issues_of(exc)[0][0] == f"{Q0}.Networking.SubnetIds"
    assert "a cluster placement group" in issues_of(exc)[0][1]
    assert "2 subnets mean 2 AZs" in issues_of(exc)[0][1]
    with pytest.raises(ConfigInvalid) as exc:  # with the map: the AZs by name
        validate(raw, subnet_azs={"subnet-0a1b2c3d4e5f60001": "us-east-2b",
                                  "subnet-0a1b2c3d4e5f60009": "us-east-2c"})
    assert "subnet-0a1b2c3d4e5f60009 in us-east-2c" in issues_of(exc)[0][1]
    q["Networking"]["PlacementGroup"]["Enabled"] = False
    validate(raw)  # neither EFA nor a placement group: several AZs are fine


def test_max_count_below_min_count_with_parallelclusters_defaults():
    raw = ondemand()
    cr = raw["Scheduling"]["SlurmQueues"][1]["ComputeResources"][0]
    del cr["MaxCount"]
    cr["MinCount"] = 12  # ParallelCluster's default MaxCount is 10
    with pytest.raises(ConfigInvalid) as exc:
        validate(raw)
    assert issues_of(exc) == [("Scheduling.SlurmQueues[1].ComputeResources[0].MaxCount",
                               "MaxCount (10) is less than MinCount (12): raise MaxCount or "
                               "lower MinCount")]


def test_gpu_queue_by_name_or_by_compute_resource_is_a_warning():
    raw = ondemand()
    raw["Scheduling"]["SlurmQueues"][1]["ComputeResources"][0]["InstanceType"] = "c7i.48xlarge"
    raw["Scheduling"]["SlurmQueues"][1]["ComputeResources"][0]["Efa"]["Enabled"] = False
    warnings = validate(raw).warnings
    assert [w.path for w in warnings] == [
        "Scheduling.SlurmQueues[1].ComputeResources[0].InstanceType"]
    raw = ondemand()
    cr = raw["Scheduling"]["SlurmQueues"][0]["ComputeResources"][0]
    cr["Name"] = "gpu-nodes"
    assert "compute resource 'gpu-nodes' of queue 'cpu' is named like a GPU queue" in (
        validate(raw).warnings[0].message)


def test_unknown_instance_type_and_duplicate_names():
    raw = ondemand()
    raw["Scheduling"]["SlurmQueues"][0]["ComputeResources"][0]["InstanceType"] = "hpc7a.96xlarg"
    raw["Scheduling"]["SlurmQueues"][1]["Name"] = "cpu"
    with pytest.raises(ConfigInvalid) as exc:
        validate(raw)
    messages = dict(issues_of(exc))
    assert "did you mean hpc7a.96xlarge" in messages[f"{CR00}.InstanceType"]
    assert messages["Scheduling.SlurmQueues[1].Name"] == (
        "queue name 'cpu' is already used by Scheduling.SlurmQueues[0]")


def test_the_instance_data_is_describe_instance_types(aws):
    """The shipped list is what EC2 DescribeInstanceTypes says (moto serves AWS's snapshot)."""
    efa = [{"Name": "network-info.efa-supported", "Values": ["true"]}]
    fetched = instance_types.fetch(aws.client("ec2"), efa)
    shipped = json.loads(instance_types.DATA.read_text())["types"]
    assert fetched == {name: shipped[name] for name in instance_types.efa_capable()}
    assert {"hpc7a.96xlarge", "c6in.32xlarge", "c5n.18xlarge", "p5.48xlarge",
            "p4d.24xlarge"} <= set(instance_types.efa_capable())
    assert "c6i.xlarge" not in instance_types.efa_capable()
    assert instance_types.lookup("p4d.24xlarge").gpus == 8


# ------------------------------------------------------------------ account look-ups


@pytest.fixture
def vpc_us_east_2(aws: AwsTarget) -> dict[str, str]:
    ec2 = AwsTarget(region="us-east-2", endpoint_url=aws.endpoint_url,
                    embedded=True).client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.2.0.0/16")["Vpc"]["VpcId"]
    subnets = {az: ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.2.{i}.0/24",
                                     AvailabilityZone=az)["Subnet"]["SubnetId"]
               for i, az in enumerate(["us-east-2a", "us-east-2b"])}
    key = f"kp-{uuid.uuid4().hex[:8]}"
    ec2.create_key_pair(KeyName=key, KeyType="ed25519")
    return {**subnets, "key": key}


def test_aws_checks_find_missing_subnets_key_pairs_and_offerings(aws, vpc_us_east_2):
    raw = ondemand()
    raw["HeadNode"]["Networking"]["SubnetId"] = vpc_us_east_2["us-east-2b"]
    raw["HeadNode"]["Ssh"]["KeyName"] = "no-such-key"
    raw["Scheduling"]["SlurmQueues"][0]["Networking"]["SubnetIds"] = [vpc_us_east_2["us-east-2a"]]
    # queue 1 keeps the placeholder subnet, which does not exist
    with pytest.raises(ConfigInvalid) as exc:
        validate(raw, aws=aws)
    messages = dict(issues_of(exc))
    assert set(messages) == {"HeadNode.Ssh.KeyName",
                             "Scheduling.SlurmQueues[1].Networking.SubnetIds[0]",
                             f"{CR00}.InstanceType"}
    assert "aws ec2 create-key-pair --key-name no-such-key --region us-east-2" in messages[
        "HeadNode.Ssh.KeyName"]
    assert "subnet 'subnet-0a1b2c3d4e5f60001' does not exist in us-east-2" in messages[
        "Scheduling.SlurmQueues[1].Networking.SubnetIds[0]"]
    assert messages[f"{CR00}.InstanceType"].startswith(
        "hpc7a.96xlarge is not offered in us-east-2a")
    assert "it is offered in us-east-2b" in messages[f"{CR00}.InstanceType"]

    raw["HeadNode"]["Ssh"]["KeyName"] = vpc_us_east_2["key"]
    for q in raw["Scheduling"]["SlurmQueues"]:
        q["Networking"]["SubnetIds"] = [vpc_us_east_2["us-east-2b"]]
    assert validate(raw, aws=aws).region == "us-east-2"


def test_cli_check_aws_and_subnet_az_options(cli, aws, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint_url)
    # Explicit (throw-away) credentials: without them the chain would probe for an instance
    # role, which takes seconds on a machine that has none.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    shipped = SHIPPED_BATCH[0]
    result = cli.invoke(cli_app(), ["validate", "--check-aws", str(shipped)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert f"{shipped}: subnets[0]: subnet 'subnet-0f1e2d3c4b5a60002' does not exist in " \
           "us-east-1: use one of your subnets (aws ec2 describe-subnets --region us-east-1) " \
           "or create one" in lines
    assert any(ln.startswith(f"{shipped}: security_group_ids[0]: ") for ln in lines)

    raw = yaml.safe_load(shipped.read_text())
    raw["subnets"] = ["subnet-0aaaaaaaaaaaaaaa1", "subnet-0aaaaaaaaaaaaaaa2"]
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(raw))
    result = cli.invoke(cli_app(), ["validate", str(two)])
    assert result.exit_code == 1 and "Availability Zones are unknown" in result.output
    same_az = ["--subnet-az", "subnet-0aaaaaaaaaaaaaaa1=us-east-1a",
               "--subnet-az", "subnet-0aaaaaaaaaaaaaaa2=us-east-1a"]
    assert cli.invoke(cli_app(), ["validate", *same_az, str(two)]).exit_code == 0
    result = cli.invoke(cli_app(), ["validate", "--subnet-az", "us-east-1a", str(two)])
    assert result.exit_code == 2 and "SUBNET_ID=AVAILABILITY_ZONE" in result.output
