"""Issue 13, class 1, for the scripts sent to a ParallelCluster head node through SSM.

The submit script writes the batch script with a heredoc and runs as root; a value that
could end the heredoc early, or leave the quoting of the exit trap, would run there. These
tests run the provider's scripts with bash against the local Slurm (as SSM runs them on a
head node) and check for a marker file that the hostile values would create.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from infra.backends.providers.base import JobState
from infra.backends.providers.parallelcluster import ParallelClusterProvider
from infra.backends.remote_shell import LocalShell
from infra.backends.shell_safety import UnsafeValue
from infra.clusters.parallelcluster import activity_script, sections
from infra.clusters.slurm_local import LocalSlurm, slurm_env
from tests.infra.backends.test_shell_safety import hostile
from tests.slurm_fixtures import REPO, ensure_local_slurm

RECORD = ("import json, os, sys; json.dump({'argv': sys.argv[2:], 'env': os.environ['HOSTILE']}, "
          "open(sys.argv[1], 'w'))")


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


@pytest.fixture
def head_node(local_slurm: LocalSlurm, tmp_path: Path) -> ParallelClusterProvider:
    env = {**slurm_env(local_slurm.layout.root), "PYTHONPATH": str(REPO)}
    return ParallelClusterProvider(LocalShell(env=env), remote_root=str(tmp_path / "fsx"),
                                   run_as=None, python=sys.executable)


def _wait(provider: ParallelClusterProvider, job: object) -> object:
    import time

    deadline = time.monotonic() + 60
    while not (status := provider.status(job)).state.terminal:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def test_hostile_argv_and_env_reach_the_job_as_data(head_node: ParallelClusterProvider,
                                                    tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = tmp_path / "record.json"
    values = [*hostile(marker), "CLUSTERFLOW_SBATCH", f"x\nCLUSTERFLOW_SBATCH\ntouch {marker}"]
    env_value = f"v\nCLUSTERFLOW_SBATCH\ntouch {marker}\n'$(touch {marker})"
    job = head_node.submit([sys.executable, "-c", RECORD, str(out), *values], ranks=1,
                           job_name="record", workdir=tmp_path / "local" / "run-1",
                           env={"HOSTILE": env_value})
    status = _wait(head_node, job)
    assert not marker.exists(), "a value ran as a command on the head node"
    assert status.state is JobState.COMPLETED, (status, job.stderr.read_text())  # type: ignore[attr-defined]
    assert json.loads(out.read_text()) == {"argv": values, "env": env_value}
    # The exit trap quoted its paths: the exit code landed where status() reads it.
    assert (tmp_path / "fsx" / "run-1" / "record.exitcode").read_text().split() == ["0", "0"]


@pytest.mark.parametrize("changes,what", [
    ({"remote_root": "/fsx; touch /tmp/pwned"}, "remote_root"),
    ({"remote_root": "/fsx\n"}, "remote_root"),
    ({"remote_root": "/fsx/a b"}, "remote_root"),
    ({"remote_root": "/fsx/%j"}, "remote_root"),
    ({"remote_root": "/fsx/$(id)"}, "remote_root"),
    ({"partition": "cpu\n#SBATCH --wrap=id"}, "partition"),
    ({"sbatch_args": ["--exclusive\ntouch /tmp/pwned"]}, r"sbatch_args\[0\]"),
    ({"python": "python3\nid"}, "python"),
    ({"run_as": "ec2-user\nid"}, "run_as"),
])
def test_values_that_cannot_be_quoted_are_refused_up_front(changes: dict, what: str) -> None:
    with pytest.raises(UnsafeValue, match=what):
        ParallelClusterProvider(LocalShell(), **changes)


def test_a_partition_with_shell_syntax_cannot_reach_a_sbatch_line() -> None:
    provider = ParallelClusterProvider(LocalShell(), partition="cpu;id")
    with pytest.raises(UnsafeValue, match="partition"):
        provider.batch_script(["true"], ranks=1, job_name="j", directory="/fsx/r", env=None)
    with pytest.raises(UnsafeValue, match="directory"):
        ParallelClusterProvider(LocalShell()).batch_script(
            ["true"], ranks=1, job_name="j", directory="/fsx/r\nid", env=None)


def test_run_as_is_quoted_in_sudo(tmp_path: Path) -> None:
    provider = ParallelClusterProvider(LocalShell(), run_as="ec2-user;touch x")
    script = provider.submit_script("#!/bin/bash\ntrue\n", directory="/fsx/r", job_name="j")
    assert "sudo -iu 'ec2-user;touch x' bash -c" in script
    assert "chown -R 'ec2-user;touch x' /fsx/r" in script


def test_the_idle_check_quotes_the_remote_root(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / f"fsx; touch {marker}; $(touch {marker})"
    (root / "run-1").mkdir(parents=True)
    (root / "run-1" / "heat.exitcode").write_text("0\n")
    result = LocalShell().run(activity_script(str(root)))
    assert not marker.exists()
    assert float(sections(result.stdout)["last_exit"].strip()) > 0
    with pytest.raises(UnsafeValue, match="remote_root"):
        activity_script("/fsx\ntouch /tmp/pwned")
