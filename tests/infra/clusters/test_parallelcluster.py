"""ParallelCluster: lifecycle through pcluster.lib, jobs through SSM, the teardown policy.

CloudFormation cannot deploy a cluster on moto, so the lifecycle is checked three ways: the
requests clusterflow makes are checked against pcluster.lib's own operation model; real
``pcluster.lib`` calls against the moto server give the real "not found" errors; and the
batch scripts the provider sends to the head node run for real on a local Slurm (bash in
place of SSM), while the SSM transport is checked on moto (which records commands and
answers Success with no output) and with botocore's Stubber for what moto cannot say.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.stub import Stubber
from pydantic import TypeAdapter, ValidationError

from infra.aws.clients import AwsTarget
from infra.backends.providers.base import JobState
from infra.backends.providers.parallelcluster import ParallelClusterProvider, status_from
from infra.backends.remote_shell import LocalShell, RemoteCommandError
from infra.backends.ssm import SsmShell
from infra.clusters.config_issues import ConfigInvalid
from infra.clusters.parallelcluster import (
    Activity,
    ClusterCreateFailed,
    ClusterNotFound,
    IdleMinutes,
    ParallelCluster,
    TeardownPolicy,
    cluster_session,
    enforce_teardown,
    idle_since,
    parse_squeue,
    teardown_decision,
)
from infra.clusters.parallelcluster_validate import load_cluster_config, validate_cluster_config
from infra.clusters.slurm_local.cluster import LocalSlurm
from infra.clusters.slurm_local.layout import slurm_env
from tests.slurm_fixtures import ensure_local_slurm

REPO = Path(__file__).resolve().parents[3]
SPOT = REPO / "cluster_configs" / "efa-spot-us-east-1.yaml"
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


# ------------------------------------------------------------------ teardown policy


def test_teardown_policy_spellings():
    adapter = TypeAdapter(TeardownPolicy)
    assert adapter.validate_python("after_run") == "after_run"
    assert adapter.validate_python("never") == "never"
    assert adapter.validate_python({"idle_minutes": 30}) == IdleMinutes(idle_minutes=30)
    for bad in ("sometimes", {"idle_minutes": 0}, {"idle_minutes": 5, "x": 1}):
        with pytest.raises(ValidationError):
            adapter.validate_python(bad)


@pytest.mark.parametrize("policy, finished, busy, idle_min, delete", [
    ("after_run", True, False, None, True),
    ("after_run", True, True, None, True),  # the run is over; stragglers go with the cluster
    ("after_run", False, False, 500, False),
    ("never", True, False, 10_000, False),
    (IdleMinutes(idle_minutes=30), True, False, 31, True),
    (IdleMinutes(idle_minutes=30), True, False, 30, True),
    (IdleMinutes(idle_minutes=30), True, False, 29, False),
    (IdleMinutes(idle_minutes=30), True, True, 600, False),
    (IdleMinutes(idle_minutes=30), True, False, None, False),  # unknown: never on a guess
])
def test_teardown_decision(policy, finished, busy, idle_min, delete):
    since = None if idle_min is None else NOW - timedelta(minutes=idle_min)
    decision = teardown_decision(policy, run_finished=finished, busy=busy, idle_since=since,
                                 now=NOW)
    assert decision.delete is delete and decision.reason


def test_idle_time_from_squeue_exit_files_and_creation():
    text = ("12|COMPLETED|2026-11-26T11:20:00\n13|FAILED|2026-11-26T11:40:00\n"
            "14|CANCELLED|Unknown\n")
    assert parse_squeue(text) == Activity(False, datetime(2026, 11, 26, 11, 40,
                                                          tzinfo=timezone.utc))
    assert parse_squeue(text + "15|PENDING|Unknown\n").busy
    assert parse_squeue("16|RUNNING|2026-11-26T13:00:00\n").busy
    assert parse_squeue("") == Activity(False, None)
    created = NOW - timedelta(hours=3)
    later_exit = (NOW - timedelta(minutes=5)).timestamp()
    assert idle_since(Activity(False, None), None, created) == created
    assert idle_since(parse_squeue(text), later_exit, created) == NOW - timedelta(minutes=5)


# ------------------------------------------------------------------ pcluster.lib, checked


class RecordingApi:
    """Answers for ``pcluster.lib`` that first check each call against pcluster.lib's own
    operation model (required and allowed arguments, as its generated functions do)."""

    def __init__(self, answers: dict[str, list[Any]]) -> None:
        from pcluster.lib import lib
        from pcluster.utils import to_snake_case

        model = lib._load_model()
        self.params = {}
        for op, spec in model.items():
            names = {to_snake_case(p["name"]): p["required"] for p in spec["params"]}
            if op in ("create-cluster", "delete-cluster", "update-cluster"):
                names["wait"] = False
            self.params[to_snake_case(op)] = names
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op not in self.params:
            raise AttributeError(op)

        def call(**kwargs: Any) -> Any:
            allowed = self.params[op]
            missing = {k for k, required in allowed.items() if required} - set(kwargs)
            unexpected = set(kwargs) - set(allowed)
            assert not missing and not unexpected, (op, missing, unexpected)
            self.calls.append((op, kwargs))
            answer = self.answers[op].pop(0) if len(self.answers.get(op, [])) > 1 else \
                self.answers[op][0]
            if isinstance(answer, Exception):
                raise answer
            return answer

        return call

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


def not_found(name: str = "c1") -> Exception:
    from pcluster.api.errors import NotFoundException

    return NotFoundException(f"Cluster '{name}' does not exist or belongs to an incompatible "
                             "ParallelCluster major version.")


def described(status: str, **extra: Any) -> dict[str, Any]:
    return {"clusterName": "c1", "clusterStatus": status, "region": "us-east-1",
            "creationTime": "2026-11-26T09:00:00.000Z",
            "headNode": {"instanceId": "i-0123456789abcdef0", "state": "running"}, **extra}


@pytest.fixture
def account(aws: AwsTarget) -> dict[str, Any]:
    """The spot config with a subnet and key pair that exist on the endpoint."""
    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24",
                               AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
    key = f"kp-{uuid.uuid4().hex[:8]}"
    ec2.create_key_pair(KeyName=key, KeyType="ed25519")
    raw = yaml.safe_load(SPOT.read_text())
    raw["HeadNode"]["Networking"]["SubnetId"] = subnet
    raw["HeadNode"]["Ssh"]["KeyName"] = key
    for q in raw["Scheduling"]["SlurmQueues"]:
        q["Networking"]["SubnetIds"] = [subnet]
    return raw


def test_create_sends_the_config_and_reports_progress(aws, account):
    api = RecordingApi({
        "describe_cluster": [not_found(), described("CREATE_IN_PROGRESS"),
                             described("CREATE_IN_PROGRESS"), described("CREATE_COMPLETE")],
        "create_cluster": [{"cluster": {"clusterName": "c1"}}],
        "get_cluster_stack_events": [{"events": [
            {"eventId": "e1", "timestamp": "2026-11-26T09:01:00Z", "resourceStatus":
             "CREATE_IN_PROGRESS", "logicalResourceId": "HeadNode"},
            {"eventId": "e2", "timestamp": "2026-11-26T09:02:00Z", "resourceStatus":
             "CREATE_COMPLETE", "logicalResourceId": "FSx", "resourceStatusReason": "ok"}]}],
    })
    said: list[str] = []
    cluster = ParallelCluster("c1", aws, api=api, poll_s=0)
    desc = cluster.create(validate_cluster_config(account), progress=said.append)
    assert desc["clusterStatus"] == "CREATE_COMPLETE"
    op, kwargs = api.calls[1]
    assert op == "create_cluster"
    assert kwargs == {"cluster_name": "c1", "region": "us-east-1", "wait": False,
                      "cluster_configuration": account, "rollback_on_failure": True}
    assert said == ["creating cluster c1 in us-east-1", "cluster c1: CREATE_IN_PROGRESS",
                    "  CREATE_IN_PROGRESS HeadNode", "  CREATE_COMPLETE FSx: ok",
                    "cluster c1: CREATE_COMPLETE"]  # each event once


def test_create_is_idempotent_and_failures_say_where_to_look(aws, account):
    api = RecordingApi({"describe_cluster": [described("CREATE_COMPLETE")]})
    ParallelCluster("c1", aws, api=api, poll_s=0).create(validate_cluster_config(account))
    assert "create_cluster" not in api.ops()

    failures = [{"failureCode": "HeadNodeBootstrapFailure",
                 "failureReason": "Cluster creation timed out."}]
    api = RecordingApi({"describe_cluster": [not_found(), described("CREATE_FAILED",
                                                                    failures=failures)],
                        "create_cluster": [{}], "get_cluster_stack_events": [{"events": []}]})
    with pytest.raises(ClusterCreateFailed, match="HeadNodeBootstrapFailure: Cluster creation "
                       "timed out.*pcluster get-cluster-stack-events -n c1 -r us-east-1"):
        ParallelCluster("c1", aws, api=api, poll_s=0).create(validate_cluster_config(account))


def test_create_refuses_a_missing_subnet_before_calling_pcluster(aws, account):
    queue = account["Scheduling"]["SlurmQueues"][1]
    queue["Networking"]["SubnetIds"] = ["subnet-0f0f0f0f0f0f0f0f0"]
    offline = validate_cluster_config(account)  # offline it cannot know
    api = RecordingApi({"describe_cluster": [not_found()]})
    with pytest.raises(ConfigInvalid) as exc:
        ParallelCluster("c1", aws, api=api).create(offline)
    assert [i.path for i in exc.value.issues] == [
        "Scheduling.SlurmQueues[1].Networking.SubnetIds[0]"]
    assert api.ops() == ["describe_cluster"]


def test_delete_and_compute_fleet(aws):
    api = RecordingApi({"delete_cluster": [{}],
                        "describe_cluster": [described("DELETE_IN_PROGRESS"), not_found()],
                        "update_compute_fleet": [{"status": "STOP_REQUESTED"}]})
    cluster = ParallelCluster("c1", aws, api=api, poll_s=0)
    assert cluster.update_compute_fleet("STOP_REQUESTED") == {"status": "STOP_REQUESTED"}
    assert cluster.delete() is True
    assert api.calls[1] == ("delete_cluster", {"cluster_name": "c1", "region": "us-east-1",
                                               "wait": False})
    assert api.calls[0][1]["status"] == "STOP_REQUESTED"


def test_real_pcluster_lib_errors_are_mapped(aws):
    """pcluster.lib itself, against the moto server: real 404s, mapped to actionable errors."""
    cluster = ParallelCluster(f"absent-{uuid.uuid4().hex[:6]}", aws)
    assert cluster.describe() is None
    assert cluster.delete() is False
    with pytest.raises(ClusterNotFound, match="does not exist in us-east-1 .*update the "
                       "compute fleet of.*create it with the parallelcluster backend"):
        cluster.update_compute_fleet("START_REQUESTED")
    with pytest.raises(ClusterNotFound):
        cluster.head_node_instance_id()
    bad = ParallelCluster("1_bad_name", aws)
    with pytest.raises(Exception, match="does not match") as exc:
        bad.describe()
    assert "ParallelCluster could not describe '1_bad_name'" in str(exc.value)


# ------------------------------------------------------------------ SSM transport


def test_ssm_shell_on_the_endpoint_sends_run_shell_script(aws):
    shell = SsmShell(aws, "i-0123456789abcdef0", timeout_s=120)
    result = shell.run("echo hello", comment="clusterflow test")
    assert (result.status, result.exit_code) == ("Success", 0)
    sent = aws.client("ssm").list_commands(InstanceId="i-0123456789abcdef0")["Commands"]
    mine = [c for c in sent if c["Comment"] == "clusterflow test"][-1]
    assert mine["DocumentName"] == "AWS-RunShellScript"
    assert mine["Parameters"] == {"commands": ["echo hello"], "executionTimeout": ["120"]}


def stubbed(instance: str = "i-0abc") -> tuple[SsmShell, Stubber]:
    target = AwsTarget(region="us-east-1", endpoint_url=f"http://stub-{uuid.uuid4().hex}.invalid")
    shell = SsmShell(target, instance, max_poll_s=0.01)
    return shell, Stubber(target.client("ssm"))


def test_ssm_shell_polls_until_the_invocation_ends():
    shell, stub = stubbed()
    command_id = str(uuid.uuid4())
    stub.add_response("send_command", {"Command": {"CommandId": command_id}},
                      {"InstanceIds": ["i-0abc"], "DocumentName": "AWS-RunShellScript",
                       "Comment": "status", "Parameters": {"commands": ["squeue"],
                                                           "executionTimeout": ["600"]},
                       "TimeoutSeconds": 600})
    stub.add_client_error("get_command_invocation", "InvocationDoesNotExist")
    stub.add_response("get_command_invocation", {"Status": "InProgress"},
                      {"CommandId": command_id, "InstanceId": "i-0abc"})
    stub.add_response("get_command_invocation", {
        "Status": "Failed", "ResponseCode": 2, "StandardOutputContent": "partial",
        "StandardErrorContent": "squeue: error: Unable to contact slurm controller"}, None)
    with stub:
        result = shell.run("squeue", comment="status")
    stub.assert_no_pending_responses()
    assert (result.status, result.exit_code, result.stdout) == ("Failed", 2, "partial")
    assert "Unable to contact slurm controller" in result.stderr


def test_ssm_shell_says_what_an_unmanaged_instance_needs():
    shell, stub = stubbed()
    stub.add_client_error("send_command", "InvalidInstanceId",
                          "Instances not in a valid state for account")
    with stub, pytest.raises(RemoteCommandError, match="AmazonSSMManagedInstanceCore"):
        shell.run("true")


def test_provider_over_ssm_refuses_an_answer_without_a_job_id(aws, tmp_path):
    provider = ParallelClusterProvider(SsmShell(aws, "i-0fedcba987654321f"), partition="cpu")
    argv = [sys.executable, "-m", "mpi_jobs.heat", "--nx", "64"]
    with pytest.raises(RemoteCommandError, match="sbatch did not return a job id"):
        provider.submit(provider.launcher().command(8, argv), ranks=8, job_name="heat",
                        workdir=tmp_path / "run-7", env={"OMP_NUM_THREADS": "1"})
    sent = aws.client("ssm").list_commands(InstanceId="i-0fedcba987654321f")["Commands"][-1]
    script = sent["Parameters"]["commands"][0]
    for line in ("#SBATCH --ntasks=8", "#SBATCH --partition=cpu",
                 "#SBATCH --output=/fsx/clusterflow/run-7/heat.out",
                 "export OMP_NUM_THREADS=1",
                 "srun --mpi=pmix -n 8 python3 -m mpi_jobs.heat --nx 64",
                 "sudo -iu ec2-user bash -c"):
        assert line in script


# ------------------------------------------------------------------ teardown, enforced


def test_enforce_teardown_after_run_and_never(aws):
    api = RecordingApi({"delete_cluster": [{}], "describe_cluster": [not_found()]})
    said: list[str] = []
    decision = enforce_teardown(ParallelCluster("c1", aws, api=api, poll_s=0), "after_run",
                                progress=said.append)
    assert decision.delete and api.ops() == ["delete_cluster", "describe_cluster"]
    api = RecordingApi({"describe_cluster": [described("CREATE_COMPLETE")]})
    enforce_teardown(ParallelCluster("c1", aws, api=api), "never", progress=said.append)
    assert "delete_cluster" not in api.ops()
    assert said[-1] == ("cluster c1 stays up (teardown: never); delete it with 'pcluster "
                        "delete-cluster -n c1 -r us-east-1'")


def squeue_shell(squeue: str, last_exit: str = "") -> tuple[SsmShell, Stubber]:
    shell, stub = stubbed("i-0123456789abcdef0")
    stub.add_response("send_command", {"Command": {"CommandId": str(uuid.uuid4())}}, None)
    stub.add_response("get_command_invocation", {
        "Status": "Success", "ResponseCode": 0,
        "StandardOutputContent": f"==squeue==\n{squeue}\n==last_exit==\n{last_exit}\n"}, None)
    return shell, stub


def test_idle_teardown_reads_the_queue_on_the_head_node(aws):
    policy = IdleMinutes(idle_minutes=30)
    busy = "21|RUNNING|2026-11-26T13:00:00"
    shell, stub = squeue_shell(busy)
    api = RecordingApi({"describe_cluster": [described("CREATE_COMPLETE")]})
    with stub:
        decision = enforce_teardown(ParallelCluster("c1", aws, api=api), policy, shell=shell,
                                    now=NOW)
    assert not decision.delete and decision.reason == "jobs are pending or running"

    shell, stub = squeue_shell("21|COMPLETED|2026-11-26T11:20:00",
                               last_exit=str((NOW - timedelta(minutes=45)).timestamp()))
    api = RecordingApi({"describe_cluster": [described("CREATE_COMPLETE"),
                                             described("CREATE_COMPLETE"), not_found()],
                        "delete_cluster": [{}]})
    with stub:
        decision = enforce_teardown(ParallelCluster("c1", aws, api=api, poll_s=0), policy,
                                    shell=shell, now=NOW)
    assert decision.delete and "idle for 40 min" in decision.reason
    assert "delete_cluster" in api.ops()

    shell, stub = stubbed()
    stub.add_client_error("send_command", "InvalidInstanceId")
    api = RecordingApi({"describe_cluster": [described("CREATE_COMPLETE")]})
    with stub:
        decision = enforce_teardown(ParallelCluster("c1", aws, api=api), policy, shell=shell)
    assert not decision.delete and decision.reason.startswith("idle check failed")


def test_cluster_session_deletes_after_a_failed_run(aws, account):
    api = RecordingApi({"describe_cluster": [described("CREATE_COMPLETE"),
                                             described("CREATE_COMPLETE"), not_found()],
                        "delete_cluster": [{}]})
    cluster = ParallelCluster("c1", aws, api=api, poll_s=0)
    with pytest.raises(RuntimeError, match="rank 3 failed"), \
            cluster_session(cluster, validate_cluster_config(account), "after_run"):
        raise RuntimeError("rank 3 failed")
    assert api.ops()[-2:] == ["delete_cluster", "describe_cluster"]


# ------------------------------------------------------------------ the head node's Slurm


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


@pytest.fixture
def head_node(local_slurm: LocalSlurm, tmp_path: Path) -> ParallelClusterProvider:
    """The provider's scripts run by bash against a real Slurm, as SSM runs them on a head
    node (as root here, so jobs are submitted as root rather than ec2-user)."""
    env = {**slurm_env(local_slurm.layout.root), "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "PYTHONPATH": str(REPO)}
    return ParallelClusterProvider(LocalShell(env=env), remote_root=str(tmp_path / "fsx"),
                                   run_as=None, python=sys.executable)


def wait(provider: ParallelClusterProvider, job: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status = provider.status(job)
        if status.state.terminal:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


MPI_HELLO = ("from mpi4py import MPI; import sys; c = MPI.COMM_WORLD; "
             "print(f'rank {c.rank} of {c.size}', flush=True); "
             "print(f'err {c.rank}', file=sys.stderr, flush=True); "
             "sys.exit(int(sys.argv[1]) if c.rank == 1 else 0)")


def test_sbatch_on_the_head_node_runs_ranks_and_mirrors_output(head_node, tmp_path):
    argv = [sys.executable, "-c", MPI_HELLO, "3"]
    job = head_node.submit(head_node.launcher().command(2, argv), ranks=2, job_name="hello",
                           workdir=tmp_path / "local" / "run-1")
    status = wait(head_node, job)
    assert (status.state, status.exit_code) == (JobState.FAILED, 3)
    assert sorted(job.stdout.read_text().splitlines()) == ["rank 0 of 2", "rank 1 of 2"]
    assert {"err 0", "err 1"} <= set(job.stderr.read_text().splitlines())
    remote = tmp_path / "fsx" / "run-1"
    assert (remote / "hello.exitcode").read_text().split() == ["3", "0"]  # code, attempt
    assert job.stdout.read_bytes() == (remote / "hello.out").read_bytes()


def test_large_output_arrives_whole_in_chunks(head_node, tmp_path):
    big = "import sys; sys.stdout.write(''.join(f'line {i:06d}\\n' for i in range(3000)))"
    job = head_node.submit([sys.executable, "-c", big], ranks=1, job_name="big",
                           workdir=tmp_path / "local" / "run-2")
    status = wait(head_node, job)
    assert status.state is JobState.COMPLETED
    assert job.stdout.read_text() == "".join(f"line {i:06d}\n" for i in range(3000))


def test_cancel_on_the_head_node(head_node, tmp_path):
    job = head_node.submit([sys.executable, "-c", "import time; time.sleep(120)"], ranks=1,
                           job_name="sleepy", workdir=tmp_path / "local" / "run-3")
    head_node.cancel(job)
    assert wait(head_node, job).state is JobState.CANCELLED


def test_status_from_scontrol_and_exit_files():
    line = ("JobId=7 JobName=heat UserId=root(0) JobState={} Reason={} Dependency=(null) "
            "ExitCode={} RunTime=00:00:02")
    assert status_from("", line.format("RUNNING", "None", "0:0")).state is JobState.RUNNING
    assert status_from("", line.format("PENDING", "Resources", "0:0")).state is JobState.PENDING
    done = status_from("0", line.format("COMPLETED", "None", "0:0"))
    assert (done.state, done.exit_code) == (JobState.COMPLETED, 0)
    oom = status_from("", line.format("OUT_OF_MEMORY", "OutOfMemory", "0:125"))
    assert oom.state is JobState.FAILED and oom.message == "Slurm: OUT_OF_MEMORY (OutOfMemory)"
    failed = status_from("", line.format("FAILED", "NonZeroExitCode", "4:0"))
    assert (failed.state, failed.exit_code) == (JobState.FAILED, 4)
    assert status_from("143", line.format("CANCELLED", "None", "0:15")).state \
        is JobState.CANCELLED
    # Slurm forgot the job (MinJobAge): the exit-code file still says how it ended
    gone = "slurm_load_jobs error: Invalid job id specified"
    assert status_from("0", gone).state is JobState.COMPLETED
    assert (status_from("2", gone).state, status_from("2", gone).exit_code) == (
        JobState.FAILED, 2)
    assert status_from("", gone).state is JobState.FAILED


def test_a_queue_named_in_the_config_is_the_partition(tmp_path):
    cfg = load_cluster_config(SPOT)
    queues = [q["Name"] for q in cfg.raw["Scheduling"]["SlurmQueues"]]
    provider = ParallelClusterProvider(LocalShell(), partition=queues[0])
    script = provider.batch_script(["true"], ranks=4, job_name="j", directory="/fsx/r",
                                   env=None)
    assert "#SBATCH --partition=cpu-spot" in script.splitlines()


# ------------------------------------------------------------------ the spec's backend block


def test_parallelcluster_settings_validate_the_config_with_the_spec():
    from infra.backends.settings import ParallelClusterSettings

    broken = REPO / "tests" / "fixtures" / "cluster_configs" / "pc-check-errors.yaml"
    with pytest.raises(ValidationError, match=r"Scheduling\.SlurmQueues\[0\]\.ComputeResources"
                       r"\[0\]\.MaxCount: MaxCount \(2\) is less than MinCount \(4\)"):
        ParallelClusterSettings(config=broken, cluster_name="c1")
    with pytest.raises(ValidationError, match="queue 'gpu' is not in .*cpu-spot, gpu-spot"):
        ParallelClusterSettings(config=SPOT, cluster_name="c1", queue="gpu")
    with pytest.raises(ValidationError, match="cluster_name"):
        ParallelClusterSettings(config=SPOT, cluster_name="1_bad")
    ok = ParallelClusterSettings(config=SPOT, cluster_name="c1",
                                 teardown={"idle_minutes": 20})
    assert ok.teardown == IdleMinutes(idle_minutes=20) and ok.queue is None


def test_parallelcluster_backend_creates_submits_through_ssm_and_tears_down(aws, account,
                                                                           tmp_path):
    from infra.backends.settings import ParallelClusterSettings, parallelcluster_backend

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(account))
    settings = ParallelClusterSettings(config=path, cluster_name="c1")
    api = RecordingApi({
        "describe_cluster": [not_found(), described("CREATE_COMPLETE"),
                             described("CREATE_COMPLETE"), not_found()],
        "create_cluster": [{}], "get_cluster_stack_events": [{"events": []}],
        "delete_cluster": [{}]})
    with parallelcluster_backend(settings, aws, api=api) as provider:
        assert provider.partition == "cpu-spot" and provider.run_as == "ec2-user"
        assert provider.shell.instance_id == "i-0123456789abcdef0"
        assert "delete_cluster" not in api.ops()
    assert api.ops()[-2:] == ["delete_cluster", "describe_cluster"]
