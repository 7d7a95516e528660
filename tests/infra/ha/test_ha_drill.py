"""``ha drill`` end to end for both designs: real Slurm, real handlers, the embedded endpoint.

The drill runs its own Slurm (own state dir, munged, ports) on top of
``infra.clusters.slurm_local``, so the session's shared local Slurm must come out of it untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from infra.clusters.slurm_local.cluster import LocalSlurm
from tests.slurm_fixtures import ensure_local_slurm

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _processes_mentioning(text: str) -> list[str]:
    commands = (" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
    return [cmd for cmd in commands if text in cmd]


@pytest.mark.parametrize("design", ["standby", "asg"])
def test_drill_loses_no_job(design: str, local_slurm: LocalSlurm, tmp_path: Path) -> None:
    shared_ctld = local_slurm.pid("slurmctld")
    assert shared_ctld is not None
    # One more job than the node runs at once: some jobs are queued when the head dies. Each
    # job runs 15 s: waiting for slurmctld's state save takes up to ~5 s, and what is left must
    # outlast a stalled drill on a loaded machine, or nothing is still running at the failure.
    jobs = (os.cpu_count() or 2) + 1
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SLURM_"))}
    env["CLUSTERFLOW_HOME"] = str(tmp_path / "home")
    work = tmp_path / "drills"
    proc = subprocess.run(
        [sys.executable, "-m", "infra.ha.cli", "drill", "--design", design, "--json",
         "--jobs", str(jobs), "--job-seconds", "15", "--workdir", str(work), "--timeout", "90"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)

    assert r["design"] == design
    assert r["jobs_before"] == jobs and r["jobs_completed"] == jobs and r["jobs_lost"] == 0
    assert set(r["job_states"].values()) == {"COMPLETED"}
    at = r["jobs_at_failure"]
    assert at["RUNNING"] >= 1 and at["PENDING"] >= 1, at  # both kinds survived the failover
    assert 0 < r["rto_seconds"] < 60
    assert r["old_instance"] != r["new_instance"]
    assert r["old_az"] != r["new_az"]  # the state moved across AZs as a snapshot
    assert any(line.startswith("CreateVolume") and "from snap-" in line for line in r["ebs"])
    if design == "asg":
        assert r["handler"]["launch"]["volume"]["snapshot_id"] == \
            r["handler"]["terminate"]["snapshot_id"]
        assert r["lifecycle_completion"] == ["not-implemented-by-emulator"]
        assert {"lifecycle_hooks", "complete_lifecycle_action", "az_loss"} <= set(r["emulated"])
    else:
        assert r["handler"]["action"] == "failed-over"
        assert "alarm_action" in r["emulated"]

    # The drill cleaned up after itself: no files, no daemons; the shared Slurm still serves.
    assert not any(work.iterdir())
    assert _processes_mentioning(str(work)) == []
    assert local_slurm.pid("slurmctld") == shared_ctld
    assert local_slurm.status()["up"]
