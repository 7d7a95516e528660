"""Issue 13, class 1, on a real Slurm: what a spec puts into a batch script stays data.

The original defect: a newline in an ``sbatch_args`` entry ended the ``#`` comment that records
the ``sbatch`` line, and the rest of the entry ran as a command in the job. Each test submits
through the local Slurm (``make slurm``) and checks a marker file that the hostile values
would create if any of them ran.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from infra.backends.providers.base import JobState
from infra.backends.providers.polling import Backoff, wait
from infra.backends.providers.slurm import SlurmProvider
from infra.backends.shell_safety import UnsafeValue
from infra.clusters.slurm_local import LocalSlurm
from tests.infra.backends.test_shell_safety import hostile
from tests.slurm_fixtures import ensure_local_slurm

FAST = Backoff(first=0.05, factor=1.5, cap=0.5)
# Writes its argv and one environment variable as JSON, so the test sees what the job got.
RECORD = ("import json, os, sys; json.dump({'argv': sys.argv[2:], 'env': os.environ['HOSTILE']}, "
          "open(sys.argv[1], 'w'))")


@pytest.fixture(scope="session")
def cluster() -> LocalSlurm:
    return ensure_local_slurm()


def _jobs(provider: SlurmProvider) -> set[str]:
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], env=provider.env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def _run_recorder(provider: SlurmProvider, tmp_path: Path, marker: Path) -> dict:
    out = tmp_path / "record.json"
    values = hostile(marker)
    job = provider.submit([sys.executable, "-c", RECORD, str(out), *values], ranks=1,
                          job_name="record", workdir=tmp_path / "work",
                          env={"HOSTILE": f"v\n$(touch {marker})`touch {marker}`;'\""})
    status = wait(provider, job, backoff=FAST, timeout=60)
    assert not marker.exists(), "a value ran as a command in the batch script"
    assert status.state is JobState.COMPLETED, (status, job.stderr.read_text())
    got = json.loads(out.read_text())
    assert got["argv"] == values
    assert got["env"] == f"v\n$(touch {marker})`touch {marker}`;'\""
    script = (tmp_path / "work" / "record.sbatch").read_text()
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert all(line.startswith(("#", "export ", "exec ")) for line in script.splitlines())
    return {"job_id": job.job_id, "script": script}


def test_a_newline_in_sbatch_args_is_refused_before_anything_is_submitted(
        cluster: LocalSlurm, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    probe = SlurmProvider(slurm_conf=cluster.layout.conf)
    before = _jobs(probe)
    for bad in (f"--comment=x\ntouch {marker}", f"--comment=x\r\n#SBATCH --wrap=touch {marker}",
                "--comment=\x00"):
        with pytest.raises(UnsafeValue, match=r"sbatch_args\[1\] .* contains"):
            SlurmProvider(slurm_conf=cluster.layout.conf, sbatch_args=["--exclusive", bad])
    with pytest.raises(UnsafeValue, match="partition"):
        SlurmProvider(slurm_conf=cluster.layout.conf, partition=f"local\ntouch {marker}")
    assert _jobs(probe) == before
    assert not marker.exists() and not list(tmp_path.rglob("*.sbatch"))


def test_odd_but_safe_sbatch_args_reach_slurm_literally(cluster: LocalSlurm,
                                                        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    comment = f"a b;c $(touch {marker}) `touch {marker}` && touch {marker} 'q\""
    provider = SlurmProvider(slurm_conf=cluster.layout.conf,
                             sbatch_args=[f"--comment={comment}"])
    job = _run_recorder(provider, tmp_path, marker)
    shown = subprocess.run(["scontrol", "show", "job", "-o", job["job_id"]], env=provider.env(),
                           capture_output=True, text=True, timeout=30)
    assert f"Comment={comment}" in shown.stdout, shown.stdout
    [recorded] = [ln for ln in job["script"].splitlines() if ln.startswith("#   sbatch ")]
    assert shlex.quote(f"--comment={comment}") in recorded
    assert not marker.exists()


def test_the_recorded_sbatch_line_cannot_break_out_of_its_comment(cluster: LocalSlurm,
                                                                   tmp_path: Path) -> None:
    """The original exploit, with the constructor's check bypassed: the script stays safe."""
    marker = tmp_path / "pwned"
    provider = SlurmProvider(slurm_conf=cluster.layout.conf)
    # Quoted with shlex alone, line 2 of this value was the command `touch <marker>`.
    provider.sbatch_args = (f"--comment=x'\ntouch {marker}\n'",)
    job = _run_recorder(provider, tmp_path, marker)
    [recorded] = [ln for ln in job["script"].splitlines() if ln.startswith("#   sbatch ")]
    assert f"$'--comment=x\\'\\ntouch {marker}\\n\\''" in recorded
    assert not marker.exists()
