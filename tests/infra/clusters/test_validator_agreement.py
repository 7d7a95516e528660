"""The validator against ParallelCluster itself (issue 13, classes 6 and 7): what ParallelCluster
3.16 accepts is accepted (warnings at most), its placement-group verdicts are its own (checked
against its validator classes run on its own loaded config), instance types are judged by a
complete catalog, offline means no network, and one unreadable file never hides the others."""

from __future__ import annotations

import collections
import copy
import json
import socket
from pathlib import Path
from typing import Any

import boto3
import botocore.client
import pytest
import yaml
from typer.testing import CliRunner

from infra.clusters import instance_types
from infra.clusters.batch_config import validate_batch_config
from infra.clusters.config_issues import ConfigInvalid, ConfigIssue
from infra.clusters.parallelcluster_validate import (
    _offline_pcluster,
    _region_env,
    schema_load,
    validate_cluster_config,
)
from tests.infra.clusters.test_cluster_configs import CONFIGS, FIXTURES, SHIPPED_BATCH, cli_app

UPSTREAM = FIXTURES / "pc-upstream-patterns.yaml"
PG_ERRORS = FIXTURES / "pc-placement-group-errors.yaml"


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def one_queue(queue: dict[str, Any], cr: dict[str, Any]) -> dict[str, Any]:
    raw = load(PG_ERRORS)
    base_cr = {"Name": "cr", "InstanceType": "c5n.18xlarge", "Efa": {"Enabled": True}}
    base_q = {"Name": "q", "Networking": {"SubnetIds": ["subnet-0f1e2d3c4b5a60002"]}}
    q = {**base_q, **queue, "ComputeResources": [{**base_cr, **cr}]}
    if "PlacementGroup" in queue:
        q["Networking"] = {**base_q["Networking"], "PlacementGroup": queue.pop("PlacementGroup")}
    q.pop("PlacementGroup", None)
    raw["Scheduling"]["SlurmQueues"] = [q]
    return raw


def verdicts(raw: dict[str, Any]) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """(errors, warnings) from clusterflow."""
    try:
        cluster = validate_cluster_config(copy.deepcopy(raw))
    except ConfigInvalid as e:
        return e.issues, e.warnings
    return [], list(cluster.warnings)


# ------------------------------------------------------------------ GPU health checks


def test_parallelclusters_own_patterns_are_valid_with_warnings_only():
    cluster = validate_cluster_config(load(UPSTREAM), source=str(UPSTREAM))
    assert [(w.path, w.level) for w in cluster.warnings] == [
        ("Scheduling.SlurmQueues[0].ComputeResources[2].InstanceType", "warning"),
        ("Scheduling.SlurmQueues[1].ComputeResources[0].Networking.PlacementGroup.Enabled",
         "warning"),
        ("Scheduling.SlurmQueues[3].ComputeResources[0].InstanceType", "warning"),
    ]
    assert "has GPU health checks enabled" in cluster.warnings[0].message
    assert "unknown to this catalog" in cluster.warnings[2].message


@pytest.mark.parametrize("queue_check,cr_check,name,warned", [
    (True, False, "q", False),    # the compute resource's own setting wins
    (False, True, "q", True),     # ... both ways
    (True, None, "q", True),      # none of its own: the queue's
    (None, None, "gpu", True),    # named like a GPU queue, no setting: a hint
    (None, False, "gpu", False),  # ... which its own Enabled: false silences
    (None, None, "q", False),
])
def test_gpu_health_checks_warn_at_most_and_resolve_like_parallelcluster(
        queue_check, cr_check, name, warned):
    queue: dict[str, Any] = {"Name": name, "PlacementGroup": {"Enabled": True}}
    cr: dict[str, Any] = {"InstanceType": "c5n.18xlarge"}
    if queue_check is not None:
        queue["HealthChecks"] = {"Gpu": {"Enabled": queue_check}}
    if cr_check is not None:
        cr["HealthChecks"] = {"Gpu": {"Enabled": cr_check}}
    errors, warnings = verdicts(one_queue(queue, cr))
    assert errors == []
    gpu = [w for w in warnings if "has no GPU" in w.message]
    assert [w.path for w in gpu] == (
        ["Scheduling.SlurmQueues[0].ComputeResources[0].InstanceType"] if warned else [])


# ------------------------------------------------------------------ placement groups


def test_placement_group_errors_are_parallelclusters():
    errors, warnings = verdicts(load(PG_ERRORS))
    assert [e.path for e in errors] == [
        "Scheduling.SlurmQueues[0].ComputeResources[0].Efa.Enabled",  # PlacementGroup: {}
        "Scheduling.SlurmQueues[1].ComputeResources[0].Efa.Enabled",  # CR {} overrides queue
        "Scheduling.SlurmQueues[2].Networking.PlacementGroup.Enabled",  # Name + Enabled: false
    ]
    assert "Scheduling.SlurmQueues[1].ComputeResources[0].Networking.PlacementGroup" in (
        errors[1].message)
    assert [w.path for w in warnings] == [
        "Scheduling.SlurmQueues[2].Networking.PlacementGroup.Enabled"]


def parallelcluster_levels(raw: dict[str, Any]) -> collections.Counter[str]:
    """The referee: ParallelCluster's own validator classes, run with the arguments its
    ``SlurmQueue`` / ``SlurmClusterConfig`` register them with, on its own loaded config."""
    from pcluster.validators.cluster_validators import EfaPlacementGroupValidator
    from pcluster.validators.ec2_validators import (
        PlacementGroupCapacityTypeValidator,
        PlacementGroupNamingValidator,
    )

    loaded, issues = schema_load(copy.deepcopy(raw), region="us-east-1")
    assert not issues
    results = []
    with _region_env("us-east-1"), _offline_pcluster("us-east-1"):
        for q in loaded.scheduling.queues:
            pgs = [q.networking.placement_group] + [
                cr.networking.placement_group for cr in q.compute_resources]
            for pg in pgs:
                if not pg.implied:
                    results += PlacementGroupNamingValidator().execute(placement_group=pg)
            for cr in q.compute_resources:
                key = q.get_placement_group_settings_for_compute_resource(cr)["key"]
                chosen = q.get_chosen_placement_group_setting_for_compute_resource(cr)
                results += EfaPlacementGroupValidator().execute(
                    efa_enabled=cr.efa.enabled, placement_group_key=key,
                    placement_group_disabled=chosen.enabled is False, multi_az_enabled=False,
                    capacity_type=q.capacity_type, queue_name=q.name)
                results += PlacementGroupCapacityTypeValidator().execute(
                    capacity_type=q.capacity_type,
                    placement_group_enabled=q.is_placement_group_enabled_for_compute_resource(cr))
    # The naming validator's existence check asks EC2; offline it answers "no AWS calls".
    return collections.Counter(r.level.name.lower() for r in results
                               if "offline validation makes no AWS calls" not in r.message)


CAPACITY_BLOCK = {"CapacityType": "CAPACITY_BLOCK"}
CB_CR = {"MinCount": 1, "MaxCount": 1,
         "CapacityReservationTarget": {"CapacityReservationId": "cr-0123456789abcdef0"}}


@pytest.mark.parametrize("queue,cr", [
    ({}, {}),
    ({"PlacementGroup": {}}, {}),
    ({"PlacementGroup": {"Enabled": True}}, {}),
    ({"PlacementGroup": {"Enabled": False}}, {}),
    ({"PlacementGroup": {"Name": "pg"}}, {}),
    ({"PlacementGroup": {"Name": "pg", "Enabled": False}}, {}),
    ({"PlacementGroup": {"Id": "pg", "Name": "pg"}}, {}),
    ({"PlacementGroup": {"Enabled": True}}, {"Networking": {"PlacementGroup": {}}}),
    ({"PlacementGroup": {"Enabled": False}},
     {"Networking": {"PlacementGroup": {"Enabled": True}}}),
    ({}, {"Networking": {"PlacementGroup": {"Enabled": False}}}),
    ({"PlacementGroup": {"Enabled": True}},
     {"Networking": {"PlacementGroup": {"Name": "pg", "Enabled": False}}}),
    (CAPACITY_BLOCK, CB_CR),
    ({**CAPACITY_BLOCK, "PlacementGroup": {"Enabled": True}}, CB_CR),
    ({"PlacementGroup": {}}, {"Efa": {"Enabled": False}}),
], ids=lambda v: json.dumps(v, sort_keys=True))
def test_placement_group_verdicts_match_parallelclusters_validators(queue, cr):
    raw = one_queue(copy.deepcopy(queue), copy.deepcopy(cr))
    errors, warnings = verdicts(raw)
    ours = collections.Counter(i.level for i in errors + warnings
                               if "PlacementGroup" in i.path or i.path.endswith("Efa.Enabled"))
    assert ours == parallelcluster_levels(raw), [str(i) for i in errors + warnings]


# ------------------------------------------------------------------ the instance catalog


def test_catalog_is_built_offline_from_moto_and_botocore(tmp_path):
    out = tmp_path / "instance_types.json"
    instance_types.main(["--out", str(out)])
    assert out.read_text() == instance_types.DATA.read_text()  # the shipped file, regenerated
    model = boto3.session.Session().client("ec2", region_name="us-east-1").meta.service_model
    botocore_names = set(model.shape_for("InstanceType").enum)
    assert botocore_names <= instance_types.known_names()
    facts_missing = sorted(botocore_names - set(instance_types.catalog()))
    assert "p3.2xlarge" in facts_missing and len(instance_types.catalog()) > 1000
    for name in facts_missing:
        with pytest.raises(instance_types.UnknownInstanceType) as exc:
            instance_types.lookup(name)
        assert exc.value.known_name and "unknown to this catalog" in str(exc.value)


def test_an_unknown_type_is_unknown_to_the_catalog_not_to_ec2():
    raw = one_queue({"PlacementGroup": {"Enabled": True}}, {"InstanceType": "c5n.18xlarg"})
    errors, _ = verdicts(raw)
    assert len(errors) == 1 and errors[0].path.endswith("ComputeResources[0].InstanceType")
    assert "unknown to this catalog" in errors[0].message
    assert "did you mean c5n.18xlarge" in errors[0].message
    assert "not an EC2 instance type" not in errors[0].message


# ------------------------------------------------------------------ offline: no network


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every botocore API call and every socket connection is recorded and refused; with
    credentials set, nothing else would stop a call from going out."""
    attempts: list[str] = []
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOFFLINETEST00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "offline")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)

    def api_call(self: Any, operation: str, params: Any) -> Any:
        attempts.append(f"{self.meta.service_model.service_name}.{operation}")
        raise AssertionError(f"network call during offline validation: {operation}")

    def connect(self: socket.socket, address: Any) -> None:
        attempts.append(f"connect {address}")
        raise OSError("network refused by the test")

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", api_call)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


def test_the_guard_catches_a_call(no_network):
    with pytest.raises(AssertionError):
        boto3.client("resource-groups", region_name="us-east-1").list_group_resources(Group="g")
    assert no_network == ["resource-groups.ListGroupResources"]


def test_offline_validate_sends_nothing_for_capacity_reservations(no_network):
    raw = load(UPSTREAM)
    assert raw["Scheduling"]["SlurmQueues"][3]["CapacityReservationTarget"]
    result = CliRunner().invoke(cli_app(), ["validate", str(UPSTREAM)])
    assert result.exit_code == 0, result.output
    assert no_network == []


# ------------------------------------------------------------------ one bad file, all reported


def bad_files(tmp_path: Path) -> dict[str, Path]:
    base = (CONFIGS / "efa-ondemand-us-east-2.yaml").read_text()
    files = {"dir": tmp_path / "a-directory"}
    files["dir"].mkdir()
    for name, region in (("placeholder", '"{{ region }}"'), ("malformed", "us east 2"),
                         ("unknown", "us-north-9")):
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(base.replace("Region: us-east-2", f"Region: {region}"))
    files["unquoted"] = tmp_path / "unquoted.yaml"
    files["unquoted"].write_text(base.replace("Region: us-east-2", "Region: {{ region }}"))
    files["binary"] = tmp_path / "binary.yaml"
    files["binary"].write_bytes(bytes(range(256)) * 8)
    files["nul"] = tmp_path / "nul.yaml"
    files["nul"].write_bytes(b"Region: us-east-2\n\x00\x01\x02")
    files["latin1"] = tmp_path / "latin1.yaml"
    files["latin1"].write_bytes(base.replace("Region: us-east-2", "# caf\xe9\nRegion: us-east-2")
                                .encode("latin-1"))
    return files


def test_every_unreadable_file_is_one_line_and_the_others_are_reported(tmp_path):
    files = bad_files(tmp_path)
    good = str(CONFIGS / "efa-spot-us-east-1.yaml")
    args = ["validate", *map(str, files.values()), good]
    result = CliRunner().invoke(cli_app(), args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    for name, path in files.items():
        mine = [ln for ln in lines if ln.startswith(f"{path}: ")]
        assert len(mine) == 1, (name, mine)
    by_name = {n: next(ln for ln in lines if ln.startswith(f"{p}: ")) for n, p in files.items()}
    assert "is a directory" in by_name["dir"]
    assert "template placeholder" in by_name["placeholder"]
    assert "template placeholders" in by_name["unquoted"]
    assert "not a well-formed AWS region" in by_name["malformed"]
    assert "not an AWS region botocore" in by_name["unknown"]
    assert "not UTF-8" in by_name["binary"] and "not UTF-8" in by_name["latin1"]
    assert "binary file" in by_name["nul"]
    assert any(ln.startswith(f"{good}: ok - ") for ln in lines)
    assert lines[-1] == f"{len(files)} error(s) in {len(files)} of {len(files) + 1} file(s)"

    result = CliRunner().invoke(cli_app(), ["validate", "--json", *args[1:]])
    out = json.loads(result.output)
    assert [r["valid"] for r in out] == [False] * len(files) + [True]
    assert all(len(r["errors"]) == 1 and "\n" not in r["errors"][0]["message"] for r in out[:-1])
    assert out[1]["errors"][0]["path"] == "Region"


def test_a_batch_config_with_a_placeholder_region_is_refused_by_field():
    raw = load(SHIPPED_BATCH[0])
    raw["region"] = "{{ region }}"
    with pytest.raises(ConfigInvalid) as exc:
        validate_batch_config(raw)
    assert [(i.path, "template placeholder" in i.message) for i in exc.value.issues] == [
        ("region", True)]


def test_an_unreachable_endpoint_is_one_line_per_file(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    placeholder = bad_files(tmp_path)["placeholder"]
    good = str(CONFIGS / "efa-spot-us-east-1.yaml")
    result = CliRunner().invoke(cli_app(), ["validate", "--check-aws", good, str(placeholder)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert [ln.split(": ")[1] for ln in lines[:-1]] == ["<aws>", "Region"], lines
    assert "the account look-ups failed" in lines[0] and f"127.0.0.1:{port}" in lines[0]
