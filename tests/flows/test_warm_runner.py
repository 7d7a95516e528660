"""``clusterflow run`` through the local stack's warm runner is the same run as in-process.

A real runner (``python -m flows.warm_runner``, as ``clusterflow local up`` starts it) on the
session's Prefect server and moto endpoint; each test runs the real console script twice,
once through the runner and once in-process (``CLUSTERFLOW_NO_WARM_RUNNER=1``), and compares
what a user and Prefect see: exit code, output, the flow run and its task runs. The runner's
log says which runs it served, so a silent fallback cannot pass for a warm run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from flows.spec import DEFAULT_SPEC
from flows.warm_client import socket_path
from flows.warm_runner import ping
from tests.conftest import BIN, REPO, run_cli


def _start_runner(home: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "runner.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "flows.warm_runner", "--home", str(home)],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while ping(home) is None:
        assert proc.poll() is None, (home / "runner.log").read_text()
        assert time.monotonic() < deadline, "the runner did not answer"
        time.sleep(0.2)
    return proc


def _stop_runner(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def runner_home(tmp_path_factory: pytest.TempPathFactory, prefect_api: str, moto_server,
                ) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("warm-home")
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "CLUSTERFLOW_HOME": str(home)}
    proc = _start_runner(home, env)
    yield home
    _stop_runner(proc)
    assert proc.returncode == 0 and not os.path.exists(socket_path(str(home)))


@pytest.fixture
def env(runner_home: Path, prefect_api: str, moto_server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PREFECT_", "CLUSTERFLOW_"))}
    env.update(PREFECT_API_URL=prefect_api, CLUSTERFLOW_HOME=str(runner_home),
               AWS_ENDPOINT_URL=moto_server.url)
    return env


def _served(home: Path) -> list[str]:
    return [line for line in (home / "runner.log").read_text().splitlines() if " run " in line]


def _both(args: list[str], env: dict[str, str], cwd: Path, home: Path,
          ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """(through the runner, in-process); asserts the runner served exactly the first."""
    before = len(_served(home))
    warm = run_cli(args, env, cwd)
    served = _served(home)[before:]
    assert len(served) == 2 and "run " + " ".join(args[1:]) in served[0], served
    cold = run_cli(args, {**env, "CLUSTERFLOW_NO_WARM_RUNNER": "1"}, cwd)
    assert len(_served(home)) == before + 2, "the in-process run went to the runner"
    return warm, cold


def _masked(text: str) -> list[str]:
    """Output lines without what differs between two runs (ids, times, hashes, ports)."""
    text = re.sub(r"\d{8}T\d{6}Z-[0-9a-f]+", "RUN", text)
    text = re.sub(r"[0-9a-f]{64}", "SHA", text)
    return [re.sub(r"\d+(\.\d+)?", "N", line).rstrip() for line in text.splitlines()]


def _heat_spec(tmp_path: Path, **changes: object) -> Path:
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec["kernel"]["parameters"] = {"nx": 45, "ny": 31, "steps": 25, "alpha": 0.2}
    spec["scratch_dir"] = str(tmp_path / "scratch")
    spec.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _flow_run(api: str, run_id: str) -> dict[str, object]:
    """The Prefect flow run whose result carries ``run_id``, with its task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), \
            get_client(sync_client=True) as client:
        for run in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=20):
            arts = client.read_artifacts(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            if any(run_id in json.dumps(a.data) for a in arts if a.data):
                tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
                    id={"any_": [run.id]}), task_run_filter=TaskRunFilter())
                return {"state": run.state_type.value, "parameters": run.parameters,
                        "tasks": sorted((t.task_key.rsplit("-", 1)[0], t.state_type.value)
                                        for t in tasks),
                        "artifacts": sorted(a.key for a in arts if a.key)}
    raise AssertionError(f"no flow run with an artifact naming {run_id}")


def test_run_through_the_runner_is_the_same_run(env, tmp_path, runner_home, prefect_api):
    spec = _heat_spec(tmp_path)
    warm, cold = _both(["run", "--spec", str(spec), "--json"], env, tmp_path, runner_home)
    assert warm.returncode == cold.returncode == 0, warm.stderr[-3000:] + cold.stderr[-3000:]
    w, c = json.loads(warm.stdout), json.loads(cold.stdout)
    assert w["run_id"] != c["run_id"]
    assert set(w) == set(c) and set(w["seconds"]) == set(c["seconds"])
    assert w["field_sha256"] == c["field_sha256"]  # the same physics, bit for bit
    assert w["fanout"] == c["fanout"]
    # Prefect's logs reach the caller's stderr, as in-process.
    assert "Beginning flow run" in warm.stderr and "Finished in state Completed" in warm.stderr
    fw, fc = _flow_run(prefect_api, w["run_id"]), _flow_run(prefect_api, c["run_id"])
    assert fw == fc and fw["state"] == "COMPLETED" and len(fw["tasks"]) >= 5

    # The human summary has the same lines (masked: ids, hashes, timings).
    warm, cold = _both(["run", "--spec", str(spec)], env, tmp_path, runner_home)
    assert warm.returncode == cold.returncode == 0
    assert _masked(warm.stdout) == _masked(cold.stdout)
    assert "succeeded" in warm.stdout


def test_failing_run_exits_1_with_the_same_message(env, tmp_path, runner_home):
    spec = tmp_path / "fails.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "fails", "ranks": 1, "scratch_dir": str(tmp_path / "scratch"),
        "steps": [{"name": "boom", "launcher": "none",
                   "command": ["python", "-c", "import sys; sys.exit(3)"]}],
        "storage": {"input_bucket": "warm-fail-in", "results_bucket": "warm-fail-out"}}))
    warm, cold = _both(["run", "--spec", str(spec)], env, tmp_path, runner_home)
    assert warm.returncode == cold.returncode == 1, warm.stderr[-3000:]
    errors = [[ln for ln in _masked(p.stderr) if "pipeline failed:" in ln] for p in (warm, cold)]
    assert errors[0] == errors[1] and errors[0], errors
    assert errors[0][0].startswith("error: pipeline failed:"), errors  # no literal [red]
    assert _masked(warm.stdout) == _masked(cold.stdout)


def test_refused_spec_exits_2_with_the_same_message(env, tmp_path, runner_home):
    spec = _heat_spec(tmp_path, ranks=0)
    warm, cold = _both(["run", "--spec", str(spec)], env, tmp_path, runner_home)
    assert warm.returncode == cold.returncode == 2
    assert warm.stderr == cold.stderr and warm.stderr.startswith("error:")
    assert warm.stdout == cold.stdout == ""


@pytest.fixture
def slow_run(env, tmp_path, runner_home,
             ) -> Iterator[tuple[subprocess.Popen[bytes], list[psutil.Process], Path]]:
    """A heat run through the runner, once its ranks run: (client, ranks, its stderr)."""
    spec = _heat_spec(tmp_path, ranks=2)
    doc = yaml.safe_load(spec.read_text())
    doc["kernel"]["parameters"] = {"nx": 256, "ny": 256, "steps": 10_000_000, "alpha": 0.2}
    spec.write_text(yaml.safe_dump(doc))
    err = tmp_path / "stderr.txt"
    runner_pid = ping(runner_home)["pid"]
    with err.open("wb") as fe:
        client = subprocess.Popen([str(BIN / "clusterflow"), "run", "--spec", str(spec)],
                                  env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=fe,
                                  stdin=subprocess.DEVNULL)
    ranks: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while len(ranks) < 2:  # the ranks are the runner's descendants, not the client's
            assert client.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the ranks did not start"
            ranks = [p for p in psutil.Process(runner_pid).children(recursive=True)
                     if "mpi_jobs.heat" in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert not psutil.Process(client.pid).children(recursive=True)
        yield client, ranks, err
    finally:
        for p in ranks:
            if p.is_running():
                p.kill()
        if client.poll() is None:
            client.kill()
            client.wait()


@pytest.mark.parametrize(("sig", "said"), [(signal.SIGINT, "Ctrl-C"),
                                           (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_through_the_client_cancels_the_run(slow_run, sig, said):
    client, ranks, err = slow_run
    client.send_signal(sig)
    assert client.wait(timeout=90) == 128 + sig  # 130 / 143, as in-process
    _, alive = psutil.wait_procs(ranks, timeout=15)
    assert alive == []
    stderr = err.read_text(errors="replace")
    assert f"interrupted ({said})" in stderr and "Traceback" not in stderr


def test_a_killed_client_has_its_run_cancelled(slow_run, runner_home):
    client, ranks, err = slow_run
    client.kill()  # SIGKILL: the client runs no code; the runner sees its socket close
    assert client.wait(timeout=10) == -signal.SIGKILL
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert alive == []
    assert "its client went away; SIGTERM" in (runner_home / "runner.log").read_text()


def test_no_runner_or_a_dead_socket_runs_in_process(env, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(socket_path(str(home)))  # a socket nobody listens on: a runner that died
    dead.close()
    spec = _heat_spec(tmp_path)
    for case_env in ({**env, "CLUSTERFLOW_HOME": str(tmp_path / "none")},
                     {**env, "CLUSTERFLOW_HOME": str(home)}):
        proc = run_cli(["run", "--spec", str(spec), "--json"], case_env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["field_sha256"]


def test_a_stale_runner_is_bypassed_and_reloads(env, tmp_path, prefect_api):
    home = tmp_path / "home"
    proc = _start_runner(home, {**os.environ, "PREFECT_API_URL": prefect_api,
                                "CLUSTERFLOW_HOME": str(home)})
    source = REPO / "flows" / "warm_client.py"
    st = source.stat()
    try:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # "edited"
        spec = _heat_spec(tmp_path, ranks=0)  # refused at once: the path is what matters
        got = run_cli(["run", "--spec", str(spec)], {**env, "CLUSTERFLOW_HOME": str(home)},
                      tmp_path)
        assert got.returncode == 2 and got.stderr.startswith("error:")
        log = (home / "runner.log").read_text()
        assert "declined a run: stale" in log and " run " not in log.split("stale", 1)[1]
        deadline = time.monotonic() + 120  # it re-executes itself (same pid) on the new code
        while "re-executing" not in (home / "runner.log").read_text() or ping(home) is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert ping(home)["pid"] == proc.pid and ping(home)["stale"] is False
    finally:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
        _stop_runner(proc)


def test_a_client_that_gives_up_before_go_starts_no_run(env, tmp_path, runner_home):
    """A client that timed out waiting for the runner runs in-process; the child forked for
    it must then do nothing (no double run)."""
    from flows.warm_client import connect, recv_msg, request, send_msg

    spec = _heat_spec(tmp_path)
    before = len(_served(runner_home))
    sock = connect(str(runner_home))
    assert sock is not None
    with sock:
        req = {**request(["clusterflow", "run", "--spec", str(spec)]), "env": env,
               "cwd": str(tmp_path)}
        send_msg(sock, req, fds=[0, 1, 2])
        reply, _ = recv_msg(sock)
        assert reply is not None and reply["ok"]
    deadline = time.monotonic() + 60
    while len(_served(runner_home)) < before + 2:  # forked, then ended without running
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert f"run {reply['pid']}: {{'exit': 0}}" in _served(runner_home)[before + 1]
    assert not (tmp_path / "scratch").exists()  # the run never started
