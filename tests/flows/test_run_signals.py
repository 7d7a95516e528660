"""A killed ``clusterflow run`` leaves no process behind (issue 13, class 4).

The real CLI runs as a user would start it: no ``PREFECT_API_URL`` (so it starts its own
temporary Prefect server), no ``AWS_ENDPOINT_URL`` (so it starts its own moto server), and a
heat job long enough to be killed mid-run. Before the kill the test records every process the
run started (its whole process tree: Prefect server, moto, ``prterun`` and the ranks); after
it, every one of them must be gone within seconds. SIGKILL runs no cleanup code at all, so
what ends them there is the parent-death signal; SIGTERM must unwind like Ctrl-C (exit 143,
one line, no traceback).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from flows.spec import DEFAULT_SPEC
from tests.conftest import BIN

RANKS = 2
GONE_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state dir for the module: the Prefect database is migrated once, not per test."""
    return tmp_path_factory.mktemp("signals-home")


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PREFECT_"))}
    env["CLUSTERFLOW_HOME"] = str(home)
    return env


def _slow_spec(tmp_path: Path) -> Path:
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    # Hours of stepping: the test decides when it ends.
    spec["kernel"]["parameters"] = {"nx": 256, "ny": 256, "steps": 10_000_000, "alpha": 0.2}
    spec["ranks"] = RANKS
    spec["scratch_dir"] = str(tmp_path / "scratch")
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _tree_once_ranks_run(proc: subprocess.Popen[bytes], timeout: float = 300,
                         ) -> list[psutil.Process]:
    """Every descendant of ``proc`` once all ranks run (the moment to kill it)."""
    root = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before its ranks started ({proc.returncode})"
        tree = root.children(recursive=True)
        if sum(_cmdline(p).split(" -m ")[-1].startswith("mpi_jobs.heat")
               for p in tree) >= RANKS:
            return tree
        time.sleep(0.2)
    raise AssertionError("the ranks did not start in time")


@pytest.fixture
def started(env: dict[str, str], tmp_path: Path,
            ) -> Iterator[tuple[subprocess.Popen[bytes], list[psutil.Process], Path]]:
    err = tmp_path / "stderr.txt"
    with err.open("wb") as fe:
        proc = subprocess.Popen([str(BIN / "clusterflow"), "run", "--spec",
                                 str(_slow_spec(tmp_path))], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=fe, stdin=subprocess.DEVNULL)
    tree: list[psutil.Process] = []
    try:
        tree = _tree_once_ranks_run(proc)
        commands = [_cmdline(p) for p in tree]
        # The snapshot holds everything the issue found orphaned, so the test proves it.
        for what in ("prefect server start", "infra.aws.moto_server", "prterun"):
            assert any(what in c for c in commands), (what, commands)
        yield proc, tree, err
    finally:
        for p in [*tree]:  # never leave a process behind, whatever the outcome
            try:
                p.kill()
            except psutil.Error:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _survivors(tree: list[psutil.Process]) -> list[str]:
    _, alive = psutil.wait_procs(tree, timeout=GONE_WITHIN_S)
    return [f"{p.pid} {_cmdline(p)}" for p in alive]


def test_sigkill_leaves_no_process_behind(started):
    proc, tree, _ = started
    os.kill(proc.pid, signal.SIGKILL)  # the run itself only: no cleanup code can run
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert _survivors(tree) == []


def test_sigterm_cleans_up_like_ctrl_c(started):
    proc, tree, err = started
    os.kill(proc.pid, signal.SIGTERM)  # what `timeout` and schedulers send
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert _survivors(tree) == []
    stderr = err.read_text(errors="replace")
    assert "Traceback" not in stderr
    assert "interrupted (SIGTERM)" in stderr
