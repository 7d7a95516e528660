"""Multi-step pipelines end to end through the real CLI: real ranks, real moto server, real
Prefect server, and the real local Slurm for job arrays.

What is checked is what a user relies on: every point's outputs in S3 under
``<run>/<step>/<point>/`` with the sha256 the run's manifest states, fan-in seeing every
point, a failed point leaving its siblings finished, a re-run computing only what failed,
and the same sweep going to Slurm as one job array.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from infra.aws.clients import AwsTarget
from infra.clusters.slurm_local import LocalSlurm, slurm_env
from mpi_jobs.montecarlo import MonteCarlo, reference_var
from mpi_jobs.portfolio import load_portfolio
from tests.conftest import REPO, run_cli
from tests.slurm_fixtures import ensure_local_slurm

FIX = REPO / "tests" / "fixtures" / "steps"


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _spec(tmp_path: Path, name: str, steps: list[dict], **extra: object) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "ranks": 2, "steps": steps,
        "storage": {"input_bucket": f"{name}-in", "results_bucket": f"{name}-out"},
        **extra}))
    return path


def _run(spec: Path, env: dict[str, str], cwd: Path, *extra: str,
         expect: int = 0) -> dict:
    proc = run_cli(["run", "--spec", str(spec), "--json", *extra], env, cwd, timeout=400)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _get(aws: AwsTarget, result: dict, key: str) -> bytes:
    url = urlparse(result["s3"]["results"])
    return aws.client("s3").get_object(Bucket=url.netloc,
                                       Key=url.path.lstrip("/") + key)["Body"].read()


def _run_events_queue(aws: AwsTarget) -> str:
    """A FIFO queue on the run-events topic, as `clusterflow events apply` would make it."""
    sns, sqs = aws.client("sns"), aws.client("sqs")
    topic = sns.create_topic(Name="clusterflow-run-events.fifo",
                             Attributes={"FifoTopic": "true"})["TopicArn"]
    url = sqs.create_queue(QueueName="steps-test-run-events.fifo",
                           Attributes={"FifoQueue": "true"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn,
                  Attributes={"RawMessageDelivery": "true"})
    return url


def _run_events(aws: AwsTarget, url: str, run_id: str) -> list[str]:
    from event_bridge.run_events import parse_run_event

    sqs, stages = aws.client("sqs"), []
    while True:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                  WaitTimeSeconds=0).get("Messages", [])
        if not got:
            return stages
        for m in got:
            detail = parse_run_event(m["Body"])["detail"]
            if detail["run_id"] == run_id:
                stages.append(detail["stage"])
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def _sweep_steps(flag: Path | None = None, backend: str | None = None,
                 per_point: bool = False) -> list[dict]:
    cmd = ["python", str(FIX / "point.py"), "{params.x}", "{out}"]
    if flag is not None:
        cmd += ["--fail-if-exists", str(flag)]
    sq = {"name": "sq", "command": cmd, "launcher": "none", "ranks": 1,
          "sweep": {"x": {"range": [0, 8]}, "max_parallel": 4}, "outputs": ["value.json"]}
    if backend:
        sq["backend"] = backend
    total = {"name": "total", "launcher": "none", "ranks": 1,
             "command": ["python", str(FIX / "total.py"), "{inputs.values}",
                         "{out}/total.json"],
             "inputs": {"values": "steps.sq.outputs/value.json"}}
    if per_point:
        double = {"name": "double", "per_point": True, "launcher": "none", "ranks": 1,
                  "command": ["python", str(FIX / "total.py"), "{inputs.value}",
                              "{out}/total.json", "{inputs.value}"],
                  "inputs": {"value": "steps.sq.outputs/value.json"}}
        return [sq, total, double]
    return [sq, total]


def _points(result: dict, step: str) -> dict[str, dict]:
    return {p["point"]: p for p in result["steps"][step]["points"]}


def test_a_dag_with_fan_in_runs_each_step_after_its_inputs(aws, cli_env, tmp_path):
    steps = [
        {"name": "prep", "command": ["python", str(FIX / "point.py"), "7", "{out}"],
         "launcher": "none", "ranks": 1},
        {"name": "risk", "uses": "var", "needs": ["prep"],
         "parameters": {"paths": 20_011, "block_paths": 4096, "seed": 3}},
        {"name": "pi", "needs": ["prep"], "ranks": 2,
         "command": ["python", str(REPO / "examples" / "mpi4py-montecarlo" / "pi.py"),
                     "--samples", "300000", "--out", "{out}/estimate.json"]},
        {"name": "combine", "launcher": "none", "ranks": 1,
         "command": ["python", str(FIX / "total.py"), "{inputs.prep}", "{out}/total.json",
                     "{inputs.var}", "{inputs.pi}"],
         "inputs": {"prep": "steps.prep.outputs", "var": "steps.risk.outputs/result.json",
                    "pi": "steps.pi.outputs/estimate.json"}},
    ]
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    events = _run_events_queue(aws)
    result = _run(_spec(tmp_path, "dag", steps), cli_env, tmp_path)
    assert result["state"] == "succeeded" and result["points"] == {"total": 4, "failed": 0}
    assert list(result["steps"]) == ["prep", "risk", "pi", "combine"]

    total = json.loads(_get(aws, result, "combine/total.json"))
    var = json.loads(_get(aws, result, "risk/result.json"))
    pi = json.loads(_get(aws, result, "pi/estimate.json"))
    assert total["sum_of_squares"] == 49 and total["extra"] == [var, pi]
    mc = MonteCarlo.build(load_portfolio(None)[0], distribution="normal", df=5.0, seed=3,
                          paths=20_011, block_paths=4096)
    assert (var["var"], var["es"]) == reference_var(mc, 0.99)  # bitwise the serial answer
    assert pi["ranks"] == 2 and abs(pi["pi"] - 3.14159) < 0.02

    # The run's manifest lists every published file with its sha256; S3 agrees.
    manifest = json.loads(_get(aws, result, "manifest.json"))
    assert manifest["state"] == "succeeded" and set(manifest["steps"]) == set(result["steps"])
    names = {f["name"] for f in manifest["files"]}
    assert {"prep/value.json", "risk/result.json", "pi/estimate.json",
            "combine/total.json"} <= names
    for f in manifest["files"]:
        assert hashlib.sha256(_get(aws, result, f["name"])).hexdigest() == f["sha256"]
    step_json = json.loads(_get(aws, result, "risk/step.json"))
    assert step_json["kernel_manifest"]["kernel"] == "var"  # the kernel's own, embedded
    assert result["fanout"]["queues"]["audit"]["verified"] == 1

    # Per-point lifecycle events arrived on the FIFO topic in order: each point started
    # before it succeeded, and combine started only after every step it reads succeeded.
    stages = _run_events(aws, events, result["run_id"])
    for name in ("prep", "risk", "pi", "combine"):
        assert stages.index(f"step:{name}:started") < stages.index(f"step:{name}:succeeded")
    assert stages.index("step:combine:started") > max(
        stages.index(f"step:{n}:succeeded") for n in ("prep", "risk", "pi"))


def test_sweep_fans_in_and_a_rerun_computes_only_the_failed_point(aws, cli_env, tmp_path):
    flag = tmp_path / "broken"
    flag.write_text("x=3 fails while this exists\n")
    spec = _spec(tmp_path, "sweep", _sweep_steps(flag, per_point=True), reuse_result=True)
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url

    first = _run(spec, cli_env, tmp_path, expect=1)
    sq = _points(first, "sq")
    assert list(sq) == [f"x={i}" for i in range(8)]
    assert sq["x=3"]["state"] == "failed" and "refusing on purpose" in sq["x=3"]["error"]
    assert all(p["state"] == "completed" for k, p in sq.items() if k != "x=3")
    assert _points(first, "total")[""]["state"] == "skipped"
    # per_point: one downstream point per upstream point; only x=3's is skipped.
    double = _points(first, "double")
    assert list(double) == list(sq)
    assert [k for k, p in double.items() if p["state"] != "completed"] == ["x=3"]
    assert json.loads(_get(aws, first, "double/x=6/total.json"))["extra"][0]["square"] == 36
    assert first["points"] == {"total": 17, "failed": 3}
    value = json.loads(_get(aws, first, "sq/x=5/value.json"))
    assert value["square"] == 25 and value["point"] == "x=5"
    assert Path(value["cwd"]).name == "out"  # a command runs in its own {out}

    flag.unlink()
    second = _run(spec, cli_env, tmp_path)
    sq2 = _points(second, "sq")
    recomputed = [k for k, p in sq2.items() if p["computed_by"] == second["run_id"]]
    assert recomputed == ["x=3"]
    assert all(p["state"] == "reused" and p["computed_by"] == first["run_id"]
               for k, p in sq2.items() if k != "x=3")
    assert [k for k, p in _points(second, "double").items()
            if p["computed_by"] == second["run_id"]] == ["x=3"]
    total = json.loads(_get(aws, second, "total/total.json"))
    assert total["sum_of_squares"] == sum(i * i for i in range(8))
    assert total["points"] == [f"x={i}" for i in range(8)]
    # Reused outputs are this run's too: published under it, with the same bytes.
    assert _get(aws, second, "sq/x=5/value.json") == _get(aws, first, "sq/x=5/value.json")


def test_a_sweep_on_slurm_is_one_job_array(aws, cli_env, tmp_path, local_slurm):
    cli_env.update(slurm_env(local_slurm.layout.root))
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    result = _run(_spec(tmp_path, "array", _sweep_steps(backend="slurm")), cli_env, tmp_path)
    sq = _points(result, "sq")
    arrays = {p["job_id"].split("_")[0] for p in sq.values()}
    assert len(arrays) == 1, sq
    (array_id,) = arrays
    assert sorted(p["job_id"] for p in sq.values()) == sorted(f"{array_id}_{i}"
                                                              for i in range(8))
    assert all(p["backend"] == "slurm" for p in sq.values())
    # Slurm itself knows the eight elements of that one array, all completed.
    shown = subprocess.run(["scontrol", "show", "job", "-o", array_id], env={
        **cli_env}, capture_output=True, text=True, timeout=30).stdout.splitlines()
    tasks = sorted(int(line.split("ArrayTaskId=")[1].split()[0]) for line in shown)
    assert tasks == list(range(8))
    assert all("JobState=COMPLETED" in line for line in shown)
    # ...and its job completion log records each element with its array's id.
    conf = (local_slurm.layout.root / "slurm.conf").read_text()
    comp = Path(next(ln.split("=", 1)[1] for ln in conf.splitlines()
                     if ln.startswith("JobCompLoc=")))
    done = [ln for ln in comp.read_text().splitlines() if f" ArrayJobId={array_id} " in ln]
    assert sorted(int(ln.split(" ArrayTaskId=")[1].split()[0]) for ln in done) == \
        list(range(8))
    assert all("JobState=COMPLETED" in ln for ln in done)
    script = (tmp_path / ".clusterflow" / "scratch" / result["run_id"] / "sq"
              / "sq.sbatch").read_text()
    assert "--array=0,1,2,3,4,5,6,7%4" in script
    total = json.loads(_get(aws, result, "total/total.json"))
    assert total["sum_of_squares"] == 140


def test_fail_fast_cancels_the_rest_of_the_sweep(aws, cli_env, tmp_path):
    flag = tmp_path / "broken"
    flag.write_text("x=3 fails\n")
    steps = _sweep_steps(flag)[:1]
    steps[0]["sweep"] = {"x": {"range": [3, 7]}, "max_parallel": 1, "fail_fast": True}
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    result = _run(_spec(tmp_path, "failfast", steps), cli_env, tmp_path, expect=1)
    states = {k: p["state"] for k, p in _points(result, "sq").items()}
    assert states == {"x=3": "failed", "x=4": "skipped", "x=5": "skipped", "x=6": "skipped"}
    assert all("fail_fast" in p["error"] for k, p in _points(result, "sq").items()
               if k != "x=3")


def test_a_kernel_step_whose_launcher_exits_0_without_running_it_fails(aws, cli_env, tmp_path):
    # A launcher that reports success though no rank ran (srun after "task N launch failed",
    # a site's mpirun wrapper that swallows errors): the bundled kernel's manifest is its last
    # act, so its absence fails the point loudly instead of publishing an empty result.
    liar = tmp_path / "mpirun"
    liar.write_text("#!/bin/sh\necho 'mpirun: pretending' >&2\nexit 0\n")
    liar.chmod(0o755)
    steps = [{"name": "sim", "uses": "heat", "ranks": 2,
              "parameters": {"nx": 16, "ny": 16, "steps": 2},
              "launcher": {"mpiexec": str(liar)}}]
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    result = _run(_spec(tmp_path, "liar", steps), cli_env, tmp_path, expect=1)
    (point,) = _points(result, "sim").values()
    assert point["state"] == "failed"
    assert "ended with exit code 0 but heat wrote no manifest.json" in point["error"]
    assert "mpirun: pretending" in point["error"]


def test_ranks_that_never_launch_are_run_once_more_then_fail_loudly(aws, cli_env, tmp_path,
                                                                   local_slurm):
    # SLURM_STDOUTMODE (srun's --output) names a folder that does not exist, so slurmd cannot
    # start the step's tasks and srun exits 0 anyway. The guard fails the job (126); as
    # nothing ran, the point runs once more although it asked for no retries, then fails
    # with the reason, and Slurm's completion log holds exactly those two jobs.
    cli_env.update(slurm_env(local_slurm.layout.root))
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    name = f"neverup{uuid.uuid4().hex[:8]}"  # its jobs, and no earlier session's
    steps = [{"name": name, "backend": "slurm", "launcher": "srun", "ranks": 1,
              "command": ["python", "-c", "print('ran')"],
              "env": {"SLURM_STDOUTMODE": str(tmp_path / "no-such-dir" / "o%t")}}]
    result = _run(_spec(tmp_path, "neverup", steps), cli_env, tmp_path, expect=1)
    (point,) = _points(result, name).values()
    assert point["state"] == "failed"
    assert "srun exited 0 but 1 task launch(es) failed" in point["error"]
    conf = (local_slurm.layout.root / "slurm.conf").read_text()
    comp = Path(next(ln.split("=", 1)[1] for ln in conf.splitlines()
                     if ln.startswith("JobCompLoc=")))
    ran = [ln for ln in comp.read_text().splitlines() if f" Name={name} " in ln]
    assert len(ran) == 2, ran
    assert all("JobState=FAILED" in ln and "ExitCode=126:0" in ln for ln in ran), ran
