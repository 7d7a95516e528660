"""AWS Batch multi-node parallel with EFA: the whole control plane on the embedded endpoint.

The endpoint is a real moto server (``use_docker: false``) with clusterflow's extensions plus
EC2 placement groups (``infra.aws.moto_gaps.placement_groups``), which moto 5.2.5 lacks. moto
marks a job SUCCEEDED inside ``submit_job`` and FAILED when the server runs with
``MOTO_SIMPLE_BATCH_FAIL_AFTER``, so a second server with that variable covers failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.aws.clients import AwsTarget
from infra.aws.embedded import MotoServer, _answers
from infra.backends.providers.base import JobState
from infra.backends.providers.batch import BatchProvider
from infra.backends.providers.remote import remote_argv
from infra.clusters import batch
from infra.clusters.batch_config import BatchMnpConfig, validate_batch_config
from infra.clusters.config_issues import ConfigInvalid

REPO = Path(__file__).resolve().parents[3]
ENTRY = REPO / "infra" / "clusters" / "batch_mnp_entry.py"
SHIPPED = REPO / "cluster_configs" / "batch"


def start_server(log: Path, env: dict[str, str] | None = None) -> MotoServer:
    """The embedded endpoint with the placement-group extension (and ``env``)."""
    server = MotoServer(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        server.proc = subprocess.Popen(
            [sys.executable, "-m", "infra.aws.moto_server", "-H", "127.0.0.1", "-p",
             str(server.port)], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=REPO, env={**os.environ, **(env or {})},
            start_new_session=True)
    deadline = time.monotonic() + 60
    while not _answers(server.url):
        assert server.proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return server


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsTarget]:
    server = start_server(tmp_path_factory.mktemp("moto-batch") / "moto.log")
    yield AwsTarget(region="us-east-1", endpoint_url=server.url, embedded=True)
    server.stop()


@pytest.fixture(scope="module")
def failing_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsTarget]:
    server = start_server(tmp_path_factory.mktemp("moto-batch-fail") / "moto.log",
                          env={"MOTO_SIMPLE_BATCH_FAIL_AFTER": "0"})
    yield AwsTarget(region="us-east-1", endpoint_url=server.url, embedded=True)
    server.stop()


def network(aws: AwsTarget) -> dict[str, Any]:
    """What an account provides before clusterflow runs: VPC, subnets, SG, roles, key pair."""
    ec2, iam = aws.client("ec2"), aws.client("iam")
    tag = uuid.uuid4().hex[:8]
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24",
                                 AvailabilityZone=az)["Subnet"]["SubnetId"]
               for i, az in enumerate(["us-east-1a", "us-east-1b"])]
    sg = ec2.create_security_group(GroupName=f"efa-{tag}", Description="efa",
                                   VpcId=vpc)["GroupId"]
    role = iam.create_role(RoleName=f"batch-{tag}", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    profile = iam.create_instance_profile(
        InstanceProfileName=f"ecs-{tag}")["InstanceProfile"]["Arn"]
    ec2.create_key_pair(KeyName=f"kp-{tag}", KeyType="ed25519")
    return {"subnets": subnets, "sg": sg, "role": role, "profile": profile, "key": f"kp-{tag}"}


def raw_config(net: dict[str, Any], shipped: str = "mnp-c5n-efa.yaml", **changes: Any,
               ) -> dict[str, Any]:
    raw = yaml.safe_load((SHIPPED / shipped).read_text())
    raw.update(name=f"t-{uuid.uuid4().hex[:10]}", subnets=net["subnets"][:1],
               security_group_ids=[net["sg"]], instance_role=net["profile"],
               service_role=net["role"], key_pair=net["key"])
    raw.update(changes)
    return raw


def config(net: dict[str, Any], **changes: Any) -> BatchMnpConfig:
    return validate_batch_config(raw_config(net, **changes))


def created(aws: AwsTarget, cfg: BatchMnpConfig) -> dict[str, list[str]]:
    """What the endpoint holds under this config's names."""
    names = cfg.resource_names()
    b, ec2 = aws.client("batch"), aws.client("ec2")
    lts = ec2.describe_launch_templates(
        Filters=[{"Name": "launch-template-name", "Values": [names["launch_template"]]}])
    return {
        "compute_environments": [e["computeEnvironmentName"] for e in
                                 b.describe_compute_environments()["computeEnvironments"]
                                 if e["computeEnvironmentName"] == names["compute_environment"]],
        "job_queues": [q["jobQueueName"] for q in b.describe_job_queues()["jobQueues"]
                       if q["jobQueueName"] == names["job_queue"]],
        "job_definitions": [d["jobDefinitionArn"] for d in b.describe_job_definitions(
            jobDefinitionName=names["job_definition"], status="ACTIVE")["jobDefinitions"]],
        "launch_templates": [t["LaunchTemplateName"] for t in lts["LaunchTemplates"]],
        "placement_groups": [g["GroupName"] for g in ec2.describe_placement_groups(
            Filters=[{"Name": "group-name", "Values": [names["placement_group"]]}])[
            "PlacementGroups"]],
    }


NOTHING = {"compute_environments": [], "job_queues": [], "job_definitions": [],
           "launch_templates": [], "placement_groups": []}


# ------------------------------------------------------------------ provisioning


def test_environment_is_created_once_with_efa_and_a_cluster_placement_group(endpoint):
    net = network(endpoint)
    cfg = config(net, shipped="mnp-p4d-efa.yaml")
    said: list[str] = []
    env = batch.ensure_environment(endpoint, cfg, progress=said.append)
    ec2, b = endpoint.client("ec2"), endpoint.client("batch")

    pg = ec2.describe_placement_groups(GroupNames=[env.placement_group])["PlacementGroups"][0]
    assert pg["Strategy"] == "cluster"
    lt = ec2.describe_launch_template_versions(LaunchTemplateId=env.launch_template_id)[
        "LaunchTemplateVersions"][0]["LaunchTemplateData"]
    nics = lt["NetworkInterfaces"]
    assert [(n["NetworkCardIndex"], n["InterfaceType"]) for n in nics] == [
        (0, "efa"), (1, "efa"), (2, "efa"), (3, "efa")]  # p4d.24xlarge: 4 EFA cards
    assert all(n["Groups"] == [net["sg"]] for n in nics)

    ce = b.describe_compute_environments(computeEnvironments=[env.compute_environment_arn])[
        "computeEnvironments"][0]
    cr = ce["computeResources"]
    assert (ce["status"], ce["state"], ce["type"]) == ("VALID", "ENABLED", "MANAGED")
    assert cr["type"] == "EC2" and cr["instanceTypes"] == ["p4d.24xlarge"]
    assert cr["placementGroup"] == env.placement_group and cr["minvCpus"] == 0
    assert cr["maxvCpus"] == 4 * 96
    assert cr["launchTemplate"]["launchTemplateName"] == cfg.resource_names()["launch_template"]
    queue = b.describe_job_queues(jobQueues=[env.job_queue_arn])["jobQueues"][0]
    assert queue["computeEnvironmentOrder"][0]["computeEnvironment"] == ce["computeEnvironmentArn"]
    jd = b.describe_job_definitions(jobDefinitions=[env.job_definition_arn])["jobDefinitions"][0]
    # mnp-p4d-efa.yaml has max_interruptions: 0 (moto hands the actions back lower-case)
    assert jd["type"] == "multinode" and jd["retryStrategy"] == {
        "attempts": 1, "evaluateOnExit": [{"onStatusReason": "Host EC2*", "action": "retry"},
                                          {"onReason": "*", "action": "exit"}]}
    assert len(said) == 5

    again = batch.ensure_environment(endpoint, cfg, progress=said.append)
    assert again == env and len(said) == 5  # nothing new was created
    assert {k: len(v) for k, v in created(endpoint, cfg).items()} == {k: 1 for k in NOTHING}


def test_job_definition_node_groups_and_efa_devices(endpoint):
    cfg = config(network(endpoint), shipped="mnp-p4d-efa.yaml")
    props = batch.job_definition_request(cfg)["nodeProperties"]
    main, workers = props["nodeRangeProperties"]
    assert (main["targetNodes"], workers["targetNodes"], props["mainNode"]) == ("0:0", "1:", 0)
    for group in (main, workers):
        c = group["container"]
        assert c["instanceType"] == "p4d.24xlarge"
        assert [d["hostPath"] for d in c["linuxParameters"]["devices"]] == [
            f"/dev/infiniband/uverbs{i}" for i in range(4)]
        assert {"type": "GPU", "value": "8"} in c["resourceRequirements"]
        assert c["ulimits"] == [{"name": "memlock", "softLimit": -1, "hardLimit": -1}]
    assert main["container"]["command"][-2:] == ["--", "true"]
    # describe_job_definitions drops nodeProperties on moto; describe_jobs shows what was
    # registered, so submit a job and read it back from there.
    env = batch.ensure_environment(endpoint, cfg)
    job = batch.describe_job(endpoint, batch.submit(
        endpoint, env, name="props", main_command=["true"], ranks=16))
    assert job["nodeProperties"]["nodeRangeProperties"] == props["nodeRangeProperties"]


def test_changed_settings_are_reported_not_silently_reused(endpoint):
    net = network(endpoint)
    raw = raw_config(net)
    batch.ensure_environment(endpoint, validate_batch_config(raw))
    with pytest.raises(batch.BatchDriftError, match="maxvCpus: 576 -> 1152"):
        batch.ensure_environment(endpoint, validate_batch_config({**raw, "max_nodes": 16,
                                                                  "efa_interfaces": 1}))
    changed = {**raw, "container": {**raw["container"], "image": "other:latest"}}
    env = batch.ensure_environment(endpoint, validate_batch_config(changed))
    assert env.job_definition_arn.endswith(":2")  # a new revision for a new container


def test_delete_environment_removes_everything_and_is_idempotent(endpoint):
    cfg = config(network(endpoint))
    batch.ensure_environment(endpoint, cfg)
    deleted = batch.delete_environment(endpoint, cfg)
    assert [d.rsplit(" ", 1)[0] for d in deleted] == [
        "job queue", "compute environment", "job definition", "launch template",
        "placement group"]
    assert created(endpoint, cfg) == NOTHING
    assert batch.delete_environment(endpoint, cfg) == []


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("change, path, words", [
    ({"subnets": ["subnet-0123456789abcdef0"]}, "subnets[0]",
     "subnet 'subnet-0123456789abcdef0' does not exist in us-east-1"),
    ({"key_pair": "missing-key"}, "key_pair", "aws ec2 create-key-pair --key-name missing-key"),
    ({"security_group_ids": ["sg-0123456789abcdef0"]}, "security_group_ids[0]",
     "security group 'sg-0123456789abcdef0' does not exist"),
    ("two-azs", "subnets", "the subnets span several Availability Zones"),
    ({"instance_type": "c6i.xlarge", "efa_interfaces": None}, "instance_type",
     "'c6i.xlarge' does not support EFA"),
])
def test_bad_input_is_refused_before_anything_is_created(endpoint, change, path, words):
    net = network(endpoint)
    raw = raw_config(net, **({"subnets": net["subnets"]} if change == "two-azs" else change))
    cfg = BatchMnpConfig.model_validate(raw)  # the model alone cannot know the account
    provider = BatchProvider(endpoint, cfg)
    with pytest.raises(ConfigInvalid) as exc:
        provider.submit(["true"], ranks=72, job_name="heat", workdir=Path("/tmp/unused"))
    assert [i.path for i in exc.value.issues] == [path]
    assert words in exc.value.issues[0].message
    assert created(endpoint, cfg) == NOTHING


def test_documented_limits(endpoint):
    cfg = config(network(endpoint))
    props = batch.node_properties(cfg, 8)
    six = {**props, "nodeRangeProperties": [
        {**props["nodeRangeProperties"][0], "targetNodes": f"{i}:{i}"} for i in range(5)] + [
        {**props["nodeRangeProperties"][1], "targetNodes": "5:"}]}
    with pytest.raises(batch.BatchLimitError, match="6 node groups: AWS Batch allows at most 5"):
        batch.check_node_properties(six)
    with pytest.raises(batch.BatchLimitError, match="1001 nodes"):
        batch.check_node_properties({**props, "numNodes": 1001})
    mixed = [{"targetNodes": "1:", "containerOverrides": {"instanceType": "c6in.32xlarge"}}]
    with pytest.raises(batch.BatchLimitError, match="must use the same instance type"):
        batch.check_node_properties(props, mixed)
    gap = {**props, "nodeRangeProperties": [props["nodeRangeProperties"][0],
                                            {**props["nodeRangeProperties"][1],
                                             "targetNodes": "2:"}]}
    with pytest.raises(batch.BatchLimitError, match="must cover every node"):
        batch.check_node_properties(gap)
    assert batch.nodes_for(cfg, 37) == 2 and batch.nodes_for(cfg, 288) == 8
    with pytest.raises(batch.BatchLimitError, match="at least 2 nodes"):
        batch.nodes_for(cfg, 36)
    with pytest.raises(batch.BatchLimitError, match="need 9 nodes"):
        batch.nodes_for(cfg, 289)


# ------------------------------------------------------------------ jobs


def test_submit_sizes_the_job_and_watches_it(endpoint, tmp_path):
    cfg = config(network(endpoint))
    provider = BatchProvider(endpoint, cfg)
    sent: list[dict[str, Any]] = []
    client = endpoint.client("batch")

    def capture(params: dict[str, Any], **_: Any) -> None:
        sent.append(json.loads(json.dumps(params)))

    argv = [sys.executable, "-m", "mpi_jobs.heat", "--nx", "64"]
    command = provider.launcher().command(100, argv)
    assert command[:2] == ["python3", "/opt/clusterflow/batch_mnp_entry.py"]
    assert command[command.index("--ranks") + 1] == "100"
    assert "--mpirun-arg=--mca" in command
    assert command[command.index("--") + 1:] == ["python3", "-m", "mpi_jobs.heat", "--nx", "64"]

    client.meta.events.register("provide-client-params.batch.SubmitJob", capture)
    try:
        job = provider.submit(command, ranks=100, job_name="heat", workdir=tmp_path / "run-1",
                              env={"OMP_NUM_THREADS": "1"})
    finally:
        client.meta.events.unregister("provide-client-params.batch.SubmitJob", capture)
    overrides = sent[0]["nodeOverrides"]
    assert overrides["numNodes"] == 3  # ceil(100 / 36)
    main, workers = overrides["nodePropertyOverrides"]
    assert main["targetNodes"] == "0:0" and main["containerOverrides"]["command"] == command
    assert workers["targetNodes"] == "1:" and "command" not in workers["containerOverrides"]
    assert workers["containerOverrides"]["environment"] == [
        {"name": "OMP_NUM_THREADS", "value": "1"}]
    assert sent[0]["jobName"] == "heat-run-1"

    # moto finishes the job inside submit_job; the main node's log stream is mirrored
    stream = batch.describe_job(endpoint, job.job_id)["container"]["logStreamName"]
    logs = endpoint.client("logs")
    try:
        logs.create_log_group(logGroupName=cfg.log_group)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    logs.create_log_stream(logGroupName=cfg.log_group, logStreamName=stream)
    now = int(time.time() * 1000)
    logs.put_log_events(logGroupName=cfg.log_group, logStreamName=stream, logEvents=[
        {"timestamp": now, "message": "rank 0: step 10"},
        {"timestamp": now + 1, "message": "rank 0: done"}])
    status = provider.status(job)
    assert (status.state, status.exit_code) == (JobState.COMPLETED, 0)
    assert job.stdout.read_text() == "rank 0: step 10\nrank 0: done\n"
    provider.status(job)
    assert job.stdout.read_text() == "rank 0: step 10\nrank 0: done\n"  # not appended twice

    provider.cancel(job)  # terminate_job: accepted and recorded, whatever the state
    assert batch.describe_job(endpoint, job.job_id)["statusReason"] == batch.CANCEL_REASON


def test_a_failed_job_is_reported_as_failed(failing_endpoint, tmp_path):
    cfg = config(network(failing_endpoint))
    provider = BatchProvider(failing_endpoint, cfg)
    job = provider.submit(["true"], ranks=72, job_name="heat", workdir=tmp_path)
    status = provider.status(job)
    assert status.state is JobState.FAILED
    assert status.message  # moto gives no reason; the message says where to look


def test_failure_reasons_are_surfaced_from_every_level():
    job = {"status": "FAILED", "statusReason": "Essential container in task exited",
           "container": {"exitCode": 137, "reason": "OutOfMemoryError: Container killed"},
           "attempts": [{"statusReason": "Host EC2 terminated",
                         "container": {"exitCode": 1, "reason": "CannotPullContainerError"}},
                        {"statusReason": "Essential container in task exited",
                         "container": {"exitCode": 137}}]}
    state, code, message = batch.job_state(job)
    assert (state, code) == (JobState.FAILED, 137)
    assert message == ("Essential container in task exited; container: OutOfMemoryError: "
                       "Container killed; exit code 137; attempt 1: Host EC2 terminated; "
                       "attempt 1 container: CannotPullContainerError; attempt 1 exit code 1; "
                       "attempt 2: Essential container in task exited; attempt 2 exit code 137")
    cancelled = {"status": "FAILED", "statusReason": batch.CANCEL_REASON}
    assert batch.job_state(cancelled)[0] is JobState.CANCELLED
    for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING"):
        assert batch.job_state({"status": status})[0] is JobState.PENDING
    assert batch.job_state({"status": "RUNNING"})[0] is JobState.RUNNING


# ------------------------------------------------------------------ the node entry point


def _node(index: int, num: int, *args: str, env: dict[str, str] | None = None,
          ) -> subprocess.Popen[str]:
    node_env = {**os.environ, "AWS_BATCH_JOB_NODE_INDEX": str(index),
                "AWS_BATCH_JOB_MAIN_NODE_INDEX": "0", "AWS_BATCH_JOB_NUM_NODES": str(num),
                **(env or {})}
    if index:
        node_env["AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS"] = "127.0.0.1"
    return subprocess.Popen([sys.executable, str(ENTRY), *args], env=node_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_main_node_runs_real_mpi_over_its_own_address(tmp_path):
    from infra.backends.launchers import find_mpiexec

    mpirun = find_mpiexec() + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    hello = "from mpi4py import MPI; c = MPI.COMM_WORLD; print(f'rank {c.rank} of {c.size}')"
    main = _node(0, 1, "--port", "0", "--slots", "2", "--hostfile", str(tmp_path / "hosts"),
                 "--mpirun", mpirun, "--", sys.executable, "-c", hello)
    out, err = main.communicate(timeout=60)
    assert main.returncode == 0, err
    assert sorted(out.splitlines()) == ["rank 0 of 2", "rank 1 of 2"]
    host, slots = (tmp_path / "hosts").read_text().split()
    assert slots == "slots=2" and host != "127.0.0.1"  # its own routed address


def test_children_register_and_the_main_node_builds_the_hostfile(tmp_path):
    from infra.aws.embedded import _free_port

    port = str(_free_port())
    show = f"{sys.executable} -c 'import sys; print(sys.argv[1:]); print(open(sys.argv[2]).read())'"
    main = _node(0, 3, "--port", port, "--slots", "4", "--hostfile", str(tmp_path / "hosts"),
                 "--mpirun", show, "--mpirun-arg=--mca", "--mpirun-arg=btl", "--", "kernel",
                 env={"CLUSTERFLOW_NODE_IP": "10.0.0.10"})
    children = [_node(i, 3, "--port", port, "--slots", "4",
                      env={"CLUSTERFLOW_NODE_IP": f"10.0.0.{10 + i}"}) for i in (1, 2)]
    out, err = main.communicate(timeout=60)
    assert main.returncode == 0, err
    assert out.splitlines()[0] == str(["--hostfile", str(tmp_path / "hosts"), "-n", "12",
                                       "--mca", "btl", "kernel"])
    hosts = (tmp_path / "hosts").read_text().splitlines()
    assert hosts[0] == "10.0.0.10 slots=4"
    assert sorted(hosts[1:]) == ["10.0.0.11 slots=4", "10.0.0.12 slots=4"]
    for child in children:
        _, child_err = child.communicate(timeout=30)
        assert child.returncode == 0 and "main node finished" in child_err


def test_remote_argv_swaps_only_this_machines_interpreter():
    assert remote_argv([sys.executable, "-m", "k"], "python3") == ["python3", "-m", "k"]
    assert remote_argv(["/opt/bin/app", "x"], "python3") == ["/opt/bin/app", "x"]


# ------------------------------------------------------------------ the spec's backend block


def test_batch_backend_runs_a_job_and_removes_the_environment_after_the_run(endpoint,
                                                                            tmp_path):
    from infra.backends.settings import BatchSettings, batch_backend

    raw = raw_config(network(endpoint))
    path = tmp_path / "mnp.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = BatchSettings(config=path, teardown="after_run")
    cfg = validate_batch_config(raw)
    with batch_backend(settings, endpoint) as provider:
        assert {k: len(v) for k, v in created(endpoint, cfg).items()} == {k: 1 for k in NOTHING}
        job = provider.submit(provider.launcher().command(72, ["true"]), ranks=72,
                              job_name="heat", workdir=tmp_path / "run")
        assert provider.status(job).state is JobState.COMPLETED
    assert created(endpoint, cfg) == NOTHING


def test_batch_settings_refuse_a_bad_config_file(tmp_path):
    from pydantic import ValidationError

    from infra.backends.settings import BatchSettings

    bad = REPO / "tests" / "fixtures" / "cluster_configs" / "batch-errors.yaml"
    with pytest.raises(ValidationError, match="capacity_type: AWS Batch does not run"):
        BatchSettings(config=bad)
    assert BatchSettings(config=SHIPPED / "mnp-c5n-efa.yaml").teardown == "never"
