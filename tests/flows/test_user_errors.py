"""A user error is one line naming the file, field or setting, never a traceback (issue 13,
class 6).

Every case goes through the real ``clusterflow`` CLI the way a user met it: a binary file, a
directory or a non-UTF-8 file as a spec or fabric, a region that is a template placeholder or
malformed, an endpoint nobody listens on, a redrive method the endpoint lacks, an
``input_key`` that is not there, and text with ``[brackets]`` that rich markup used to eat.
Nothing here may start a Prefect server: each is refused before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from flows.spec import DEFAULT_SPEC
from infra.aws.clients import AwsTarget
from infra.aws.embedded import _free_port
from tests.conftest import run_cli


@dataclass
class Case:
    args: list[str]
    code: int
    names: str  # the thing the message must name, verbatim
    env: dict[str, str] = field(default_factory=dict)
    lines: int = 1  # a refused spec lists one indented line per field after its first line


def _spec(tmp: Path, **changes: object) -> Path:
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec["scratch_dir"] = str(tmp / "scratch")
    spec.update(changes)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _files(tmp: Path) -> dict[str, Path]:
    binary = tmp / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    folder = tmp / "a-folder"
    folder.mkdir()
    latin1 = tmp / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))
    fabric = tmp / "fabric.yaml"
    fabric.write_text('region: "{{ region }}"\nqueues: []\n')
    src = tmp / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    return {"binary": binary, "folder": folder, "latin1": latin1, "fabric": fabric, "src": src}


def _cases(tmp: Path, endpoint: str) -> dict[str, Case]:
    f = _files(tmp)
    closed = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    at_moto = {"AWS_ENDPOINT_URL": endpoint}
    key = "inputs/never-uploaded.npy"
    cases = {
        # clusterflow run --spec
        "run-binary": Case(["run", "--spec", str(f["binary"])], 2, f"{f['binary']} is a binary"),
        "run-directory": Case(["run", "--spec", str(f["folder"])], 2,
                              f"{f['folder']} is a directory"),
        "run-latin1": Case(["run", "--spec", str(f["latin1"])], 2,
                           f"{f['latin1']} is not UTF-8"),
        "run-missing": Case(["run", "--spec", str(tmp / "nope.yaml")], 2, "nope.yaml"),
        "run-region-placeholder": Case(
            ["run", "--spec", str(_spec(tmp / "r1", region="{{ region }}"))], 2,
            "region: '{{ region }}'", lines=2),
        "run-region-malformed": Case(
            ["run", "--spec", str(_spec(tmp / "r2", region="us east 1"))], 2,
            "region: 'us east 1'", lines=2),
        "run-endpoint-closed": Case(["run", "--spec", str(_spec(tmp / "e1"))], 2,
                                    f"AWS_ENDPOINT_URL {closed} cannot be reached",
                                    env={"AWS_ENDPOINT_URL": closed}),
        "run-input-key-missing": Case(
            ["run", "--spec", str(_spec(tmp / "k1", kernel={"name": "heat", "input_key": key},
                                        storage={"input_bucket": "user-errors-in",
                                                 "results_bucket": "user-errors-out"}))],
            2, f"kernel.input_key: s3://user-errors-in/{key} does not exist", env=at_moto),
        "run-pattern-keeps-brackets": Case(
            ["run", "--spec", str(_spec(tmp / "n1", name="Not_Valid"))], 2,
            "'^[a-z0-9][a-z0-9-]{0,40}$'", lines=2),
        # clusterflow events
        "events-binary-fabric": Case(["events", "show", "--fabric", str(f["binary"])], 2,
                                     f"{f['binary']} is a binary", env=at_moto),
        "events-latin1-fabric": Case(["events", "apply", "--fabric", str(f["latin1"])], 2,
                                     f"{f['latin1']} is not UTF-8", env=at_moto),
        "events-fabric-region": Case(["events", "show", "--fabric", str(f["fabric"])], 2,
                                     "region: '{{ region }}'", env=at_moto, lines=2),
        "events-region-flag": Case(["events", "dlq", "ls", "q", "--region", "{{ region }}"], 2,
                                   "--region: '{{ region }}'", env=at_moto),
        "events-endpoint-closed": Case(["events", "show"], 2,
                                       f"AWS_ENDPOINT_URL {closed} cannot be reached",
                                       env={"AWS_ENDPOINT_URL": closed}),
        "events-redrive-unsupported": Case(
            ["events", "dlq", "redrive", "user-errors-src", "--method", "move-task"], 2,
            "does not implement StartMessageMoveTask", env=at_moto),
        "events-name-keeps-brackets": Case(["events", "dlq", "ls", "q[a-z]"], 2, "q[a-z]",
                                           env=at_moto),
        # clusterflow stage
        "stage-endpoint-closed": Case(["stage", str(f["src"]), "s3://b1/p/"], 2,
                                      f"AWS_ENDPOINT_URL {closed} cannot be reached",
                                      env={"AWS_ENDPOINT_URL": closed}),
        "stage-region": Case(["stage", str(f["src"]), "s3://b1/p/", "--region", "{{ r }}"], 2,
                             "--region: '{{ r }}'", env=at_moto),
        "stage-bucket-keeps-brackets": Case(["stage", "s3://B[a-z]/x", str(tmp / "dst")], 2,
                                            'Invalid bucket name "B[a-z]"', env=at_moto),
        # clusterflow local / deploy
        "local-up-binary-spec": Case(["local", "up", "--spec", str(f["binary"])], 2,
                                     f"{f['binary']} is a binary"),
        "local-up-fabric-directory": Case(["local", "up", "--fabric", str(f["folder"])], 2,
                                          f"{f['folder']} is a directory"),
        "local-up-region": Case(
            ["local", "up", "--spec", str(_spec(tmp / "r3", region="{{ region }}"))], 2,
            "region: '{{ region }}'", lines=2),
        "deploy-api-closed": Case(["deploy"], 2, f"PREFECT_API_URL {closed}/api cannot be "
                                  "reached", env={"PREFECT_API_URL": f"{closed}/api"}),
    }
    return cases


CASES = ["run-binary", "run-directory", "run-latin1", "run-missing", "run-region-placeholder",
         "run-region-malformed", "run-endpoint-closed", "run-input-key-missing",
         "run-pattern-keeps-brackets", "events-binary-fabric", "events-latin1-fabric",
         "events-fabric-region", "events-region-flag", "events-endpoint-closed",
         "events-redrive-unsupported", "events-name-keeps-brackets", "stage-endpoint-closed",
         "stage-region", "stage-bucket-keeps-brackets", "local-up-binary-spec",
         "local-up-fabric-directory", "local-up-region", "deploy-api-closed"]


@pytest.fixture(scope="module")
def redrive_source(aws: AwsTarget) -> None:
    """A queue with a DLQ on the moto endpoint (moto lacks StartMessageMoveTask)."""
    sqs = aws.client("sqs")
    dlq = sqs.create_queue(QueueName="user-errors-src-dlq")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])
    sqs.create_queue(QueueName="user-errors-src", Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": arn["Attributes"]["QueueArn"], "maxReceiveCount": "3"})})
    aws.client("s3").create_bucket(Bucket="user-errors-in")


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_line_without_traceback(name, aws, redrive_source, tmp_path):
    case = _cases(tmp_path, aws.endpoint_url)[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    env.update(CLUSTERFLOW_HOME=str(tmp_path / "home"), COLUMNS="80", **case.env)
    proc = run_cli(case.args, env, tmp_path, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == case.code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: "), proc.stderr
    assert case.names in proc.stderr, proc.stderr  # whole: no wrapping, no eaten [brackets]
    assert len(lines) == case.lines, proc.stderr
    assert not (tmp_path / "home" / "prefect").exists()  # refused before Prefect started
