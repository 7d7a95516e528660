"""prefect.yaml's deployments on a real local stack: registered, triggered, run to the end.

One ``clusterflow local up`` for the module (Prefect server with triggers, moto, a process
worker, the bridge consumers), then ``clusterflow deploy``. An upload to the input bucket
must start exactly one ``hpc-pipeline/on-upload`` run even when its S3 event is delivered
twice; a result manifest must start ``postprocess/on-result``, which writes its summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote_plus

import numpy as np
import pytest
import yaml

from event_bridge.prefect_bridge import BridgeConfig, emit, prefect_events
from flows.spec import DEFAULT_SPEC
from infra.aws.clients import AwsTarget
from infra.staging.objects import sha256_file, upload
from mpi_jobs.initial_conditions import heat_hotspots
from mpi_jobs.manifest import atomic_save_npy, write_manifest
from tests.conftest import BIN, REPO

T = TypeVar("T")
NAMES = {"hpc-pipeline/nightly", "hpc-pipeline/on-upload", "postprocess/on-result",
         "guard-sweep/every-5-min"}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "clusterflow"), *args], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=240)


def _wait(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("stack")
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec["scratch_dir"] = str(base / "scratch")
    spec["kernel"]["parameters"] = {"nx": 45, "ny": 31, "steps": 25, "alpha": 0.2}
    spec_path = base / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PREFECT_", "CLUSTERFLOW_"))}
    env["CLUSTERFLOW_HOME"] = str(base / "home")
    up = _cli(["local", "up", "--spec", str(spec_path), "--json"], env)
    assert up.returncode == 0, up.stdout + up.stderr
    report = json.loads(up.stdout)
    try:
        deploying_at = datetime.now(timezone.utc)
        deployed = _cli(["deploy", "--json"], env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        yield {"env": env, "spec": spec, "spec_path": spec_path,
               "api_url": report["prefect_api_url"],
               "aws": AwsTarget(region="us-east-1", endpoint_url=report["moto_url"],
                                embedded=True),
               "deploy": json.loads(deployed.stdout), "logs": base / "home" / "logs",
               "deploying_at": deploying_at}
    finally:
        down = _cli(["local", "down", "--json"], env)
        assert down.returncode == 0, down.stderr


@contextlib.contextmanager
def _prefect(stack: dict[str, Any]) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack["api_url"]}), \
            get_client(sync_client=True) as client:
        yield client


def _runs(client: Any, deployment: str) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    dep = client.read_deployment_by_name(deployment)
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[dep.id])))


def _finished(client: Any, run_id: Any, stack: dict[str, Any], timeout: float) -> Any:
    def probe() -> Any:
        run = client.read_flow_run(run_id)
        return run if run.state and run.state.is_final() else None

    try:
        return _wait(f"flow run {run_id} to finish", probe, timeout)
    except AssertionError:
        raise AssertionError((stack["logs"] / "worker.log").read_text()[-4000:]) from None


def _automations(client: Any, deployment_id: Any) -> list[dict[str, Any]]:
    return client.request(
        "GET", f"/automations/related-to/prefect.deployment.{deployment_id}").json()


def test_deploy_registers_schedule_and_triggers(stack: dict[str, Any]) -> None:
    listed = {d["name"]: d for d in stack["deploy"]["deployments"]}
    assert set(listed) == NAMES
    with _prefect(stack) as client:
        pool = client.read_work_pool(stack["deploy"]["work_pool"])
        assert pool.type == "process"
        deps = {name: client.read_deployment_by_name(name) for name in NAMES}
        for name, dep in deps.items():
            assert str(dep.id) == listed[name]["id"]
            assert dep.work_pool_name == pool.name
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {
                "directory": str(REPO)}}]

        nightly = deps["hpc-pipeline/nightly"]
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] \
            == [("0 2 * * *", "UTC", True)]
        assert _automations(client, nightly.id) == []
        scheduled = _runs(client, "hpc-pipeline/nightly")
        assert scheduled and all(r.state_name == "Scheduled" for r in scheduled)
        assert {(r.expected_start_time.hour, r.expected_start_time.minute)
                for r in scheduled} == {(2, 0)}
        # deploy reported the same upcoming runs, earliest first, in the future.
        next_runs = [datetime.fromisoformat(t) for t in listed["hpc-pipeline/nightly"]["next_runs"]]
        assert next_runs and next_runs == sorted(next_runs)
        assert next_runs[0] == min(r.expected_start_time for r in scheduled)
        assert next_runs[0] > stack["deploying_at"]
        assert listed["hpc-pipeline/on-upload"]["next_runs"] == []
        sweep = deps["guard-sweep/every-5-min"]
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in sweep.schedules] \
            == [("*/5 * * * *", "UTC", True)]

        expected = {
            "hpc-pipeline/on-upload": ("input", {"input_key": "{{ event.resource['s3.key'] }}"}),
            "postprocess/on-result": ("result", {"bucket": "{{ event.resource['s3.bucket'] }}",
                                                 "key": "{{ event.resource['s3.key'] }}"}),
        }
        for name, (role, parameters) in expected.items():
            dep = deps[name]
            assert dep.schedules == []
            [automation] = _automations(client, dep.id)
            trigger = automation["trigger"]
            assert automation["enabled"] and trigger["posture"] == "Reactive"
            assert trigger["expect"] == ["s3.object.created"]
            assert trigger["match"] == {"prefect.resource.id": "s3.object.*",
                                        "clusterflow.role": role}
            [action] = automation["actions"]
            assert action["type"] == "run-deployment"
            assert action["parameters"] == parameters

    # Deploying again updates in place: same deployments, still one trigger each.
    again = _cli(["deploy", "--json"], stack["env"])
    assert again.returncode == 0, again.stderr
    assert {d["name"]: d["id"] for d in json.loads(again.stdout)["deployments"]} == {
        n: d["id"] for n, d in listed.items()}
    with _prefect(stack) as client:
        for name in NAMES - {"hpc-pipeline/nightly", "guard-sweep/every-5-min"}:
            assert len(_automations(client, client.read_deployment_by_name(name).id)) == 1
        # ...and the scheduled runs are not doubled.
        again_runs = _runs(client, "hpc-pipeline/nightly")
        assert sorted(r.expected_start_time for r in again_runs) == sorted(
            r.expected_start_time for r in scheduled)

    # The human form names each deployment, how it starts, and the next scheduled run.
    shown = _cli(["deploy"], {**stack["env"], "COLUMNS": "250"})
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())
    assert "registered 4 deployments" in text
    assert "guard-sweep/every-5-min cron */5 * * * * UTC" in text
    assert "cron 0 2 * * * UTC" in text and "event s3.object.created" in text
    assert min(r.expected_start_time for r in scheduled).isoformat()[:16] in text


def _queue_empty(aws: AwsTarget, name: str) -> bool:
    sqs = aws.client("sqs")
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return all(v == "0" for v in attrs.values())


def _skipped(stack: dict[str, Any], consumer: str, event_id: Any) -> bool:
    """The consumer acknowledged a delivery of this event as already processed."""
    log = (stack["logs"] / "consumers.log").read_text(errors="replace")
    return f"skipping{consumer}#{event_id}:" in "".join(log.split())  # lines may wrap


def _notification(bucket: str, key: str, etag: str) -> str:
    """An S3 Event Notification for one write, as S3 (and moto) sends it to a queue."""
    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-01-01T00:00:00.000Z", "eventName": "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket},
               "object": {"key": quote_plus(key), "size": 1, "eTag": etag}}}]})


def test_upload_starts_exactly_one_on_upload_run(stack: dict[str, Any], tmp_path: Path,
                                                 ) -> None:
    aws, storage = stack["aws"], stack["spec"]["storage"]
    bucket = storage["input_bucket"]
    config = BridgeConfig.from_spec(stack["spec_path"])
    field = heat_hotspots(31, 45)
    path = tmp_path / "upload.npy"
    atomic_save_npy(path, field)
    key = f"{config.uploads}field-{uuid.uuid4().hex[:8]}.npy"
    upload(aws, path, bucket, key)
    # Outside the uploads prefix (where the pipeline caches generated inputs): no run.
    upload(aws, path, bucket, f"{storage['input_prefix']}heat-cached.npy")

    with _prefect(stack) as client:
        [run] = _wait("the on-upload run", lambda: _runs(client, "hpc-pipeline/on-upload"),
                      timeout=180)
        assert run.parameters == {"input_key": key}

        # The same S3 event delivered again (SQS is at-least-once): the dedup store
        # acknowledges it without a second Prefect event.
        etag = aws.client("s3").head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        duplicate = _notification(bucket, key, etag)
        [event] = prefect_events(duplicate, config)
        sqs = aws.client("sqs")
        sqs.send_message(QueueUrl=sqs.get_queue_url(QueueName="input-uploads")["QueueUrl"],
                         MessageBody=duplicate)
        _wait("the duplicate to be acknowledged as such",
              lambda: _skipped(stack, "input-uploads", event.id), timeout=120)
        # Past the dedup store (a handler that died after sending): Prefect itself drops
        # an event whose id it has just seen.
        emit([event])

        time.sleep(2)  # a second trigger firing would create its run within ~0.2 s
        assert [r.id for r in _runs(client, "hpc-pipeline/on-upload")] == [run.id]

        done = _finished(client, run.id, stack, timeout=300)
        assert done.state.is_completed(), done.state

    # The run computed on the uploaded field: its grid is the upload's shape.
    s3 = aws.client("s3")
    results = storage["results_bucket"]
    listed = s3.list_objects_v2(Bucket=results, Prefix=storage["results_prefix"])["Contents"]
    manifests = [json.loads(s3.get_object(Bucket=results, Key=o["Key"])["Body"].read())
                 for o in listed if o["Key"].endswith("/manifest.json")]
    assert [m["parameters"]["nx"] for m in manifests if m["parameters"]["ny"] == 31] == [45]


def test_result_event_starts_postprocess(stack: dict[str, Any], tmp_path: Path) -> None:
    from prefect.events import Event
    from prefect.events.filters import EventFilter, EventResourceFilter

    from event_bridge.fabric import load_fabric
    from event_bridge.replay import replay

    aws, storage = stack["aws"], stack["spec"]["storage"]
    bucket = storage["results_bucket"]
    run_id = f"synthetic-{uuid.uuid4().hex[:8]}"
    prefix = f"{storage['results_prefix']}{run_id}/"
    field = np.random.default_rng(7).random((20, 30))
    out = tmp_path / "out"
    out.mkdir()
    field_path = atomic_save_npy(out / "field.npy", field)
    write_manifest(out, [field_path], kernel="heat", parameters={"nx": 30, "ny": 20})
    since = datetime.now(timezone.utc) - timedelta(seconds=5)
    upload(aws, field_path, bucket, prefix + "field.npy")
    upload(aws, out / "manifest.json", bucket, prefix + "manifest.json")

    with _prefect(stack) as client:
        def mine() -> list[Any]:
            return [r for r in _runs(client, "postprocess/on-result")
                    if r.parameters.get("key") == prefix + "manifest.json"]

        [run] = _wait("the postprocess run", mine, timeout=180)
        assert run.parameters == {"bucket": bucket, "key": prefix + "manifest.json"}
        done = _finished(client, run.id, stack, timeout=240)
        assert done.state.is_completed(), done.state

        # Replaying the archived S3 events re-delivers the manifest's event through
        # EventBridge -> SNS -> result-events; the bridge skips it, nothing runs again.
        [event] = client.read_events(filter=EventFilter(resource=EventResourceFilter(
            id=[f"s3.object.{bucket}/{prefix}manifest.json"])), limit=10).events
        replay(aws, load_fabric(), since, datetime.now(timezone.utc), wait_s=60)
        _wait("the replayed event to be skipped",
              lambda: _skipped(stack, "result-events", event.id), timeout=120)
        time.sleep(2)
        assert len(mine()) == 1
        # Only manifests are results: the summary and picture it wrote started nothing.
        keys = [r.parameters["key"] for r in _runs(client, "postprocess/on-result")]
        assert all(k.endswith("/manifest.json") for k in keys), keys
        # Control: the trigger does fire again for the same object when the event is new,
        # so one run above is deduplication, not a trigger that fires once per object.
        fresh = Event.model_validate({**event.model_dump(), "id": uuid.uuid4()})
        emit([fresh])
        _wait("a run for the fresh event", lambda: len(mine()) == 2, timeout=120)

    s3 = aws.client("s3")
    summary = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "summary.json")["Body"]
                         .read())
    stats = summary["statistics"]
    assert summary["run_id"] == run_id
    assert summary["field_sha256"] == sha256_file(field_path)
    assert stats["shape"] == [20, 30]
    assert stats["min"] == float(field.min()) and stats["max"] == float(field.max())
    assert stats["mean"] == pytest.approx(float(field.mean()), rel=1e-12)
    assert stats["argmax"] == [int(i) for i in np.unravel_index(field.argmax(), field.shape)]
    png = s3.get_object(Bucket=bucket, Key=prefix + "field.png")["Body"].read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    picture = tmp_path / "field.png"
    picture.write_bytes(png)
    import matplotlib.image

    assert matplotlib.image.imread(picture).shape[:2] == (500, 600)
    local = Path(stack["spec"]["scratch_dir"]) / run_id / "postprocess"
    assert json.loads((local / "summary.json").read_text()) == summary
    assert (local / "field.png").read_bytes() == png


def test_a_server_that_cannot_schedule_now_only_costs_the_listing(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`deploy` has registered everything by then: a server without the schedule endpoint
    (or refusing it) must not turn a good deploy into a failure."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.local_cli import _schedule_now

    class Refusing:
        def request(self, method: str, path: str, **kwargs: Any) -> Any:
            request = httpx.Request(method, f"https://api.example/{path}")
            response = httpx.Response(404, request=request, text="Not Found")
            raise PrefectHTTPStatusError("404", request=request, response=response)

        def read_flow_runs(self, **kwargs: Any) -> Any:
            raise AssertionError("nothing to list after a refused schedule")

    deployment = type("Deployment", (), {"id": uuid.uuid4(), "name": "nightly"})()
    assert _schedule_now(Refusing(), deployment) == []
    assert "did not schedule nightly's runs now (404)" in " ".join(
        capsys.readouterr().err.split())
