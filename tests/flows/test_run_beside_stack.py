"""A ``clusterflow run`` beside a running ``local up`` stack uses the stack's Prefect server.

Without ``PREFECT_API_URL`` a run used to start a temporary server of its own even with the
stack up: the run was missing from the UI the user had open, and a warm run spent ~5 s
starting that server. The stack is played here by its state file naming the session's real
Prefect server; the run must land there and start no server of its own.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from flows.prefect_runtime import STACK_STATE, stack_api
from tests.conftest import run_cli
from tests.flows.test_warm_runner import _flow_run, _heat_spec


def test_a_run_beside_a_stack_is_recorded_in_the_stacks_server(cli_env, aws, prefect_api,
                                                                tmp_path: Path) -> None:
    home = Path(cli_env["CLUSTERFLOW_HOME"])
    home.mkdir(parents=True)
    (home / STACK_STATE).write_text(json.dumps({"prefect_api_url": prefect_api}))
    env = {k: v for k, v in cli_env.items() if k != "PREFECT_API_URL"}
    env.update(AWS_ENDPOINT_URL=aws.endpoint_url, CLUSTERFLOW_NO_WARM_RUNNER="1")
    proc = run_cli(["run", "--spec", str(_heat_spec(tmp_path)), "--json"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = json.loads(proc.stdout)["run_id"]
    recorded = _flow_run(prefect_api, run_id)
    assert recorded["state"] == "COMPLETED"
    assert ("mpi_run", "COMPLETED") in recorded["tasks"]
    assert f"View at {prefect_api.removesuffix('/api')}" in proc.stderr
    assert not (home / "logs" / "prefect-temporary-server.log").exists()  # no server of its own


def test_stack_api_answers_only_for_a_live_stack(prefect_api, tmp_path: Path) -> None:
    assert stack_api(tmp_path) is None  # no stack here
    (tmp_path / STACK_STATE).write_text("{not json")
    assert stack_api(tmp_path) is None
    (tmp_path / STACK_STATE).write_text(json.dumps({"prefect_api_url": None}))
    assert stack_api(tmp_path) is None
    with socket.socket() as s:  # a stopped stack's port: refused, answered at once
        s.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    (tmp_path / STACK_STATE).write_text(json.dumps({"prefect_api_url": gone}))
    t0 = time.monotonic()
    assert stack_api(tmp_path) is None
    assert time.monotonic() - t0 < 2
    (tmp_path / STACK_STATE).write_text(json.dumps({"prefect_api_url": prefect_api}))
    assert stack_api(tmp_path) == prefect_api
