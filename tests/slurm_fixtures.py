"""The local Slurm for tests: the one ``make slurm`` runs, brought up once per session.

Use it from any test module with a session fixture of its own (pytest fixtures imported from
another module trip ruff's F811)::

    @pytest.fixture(scope="session")
    def local_slurm() -> LocalSlurm:
        return ensure_local_slurm()

and ``{**os.environ, **slurm_env(local_slurm.layout.root)}`` (or ``SLURM_CONF``) for
subprocesses, e.g. the CLI, whose ``CLUSTERFLOW_HOME`` points elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infra.clusters.slurm_local.cluster import LocalSlurm

REPO = Path(__file__).resolve().parents[1]


def state_dir() -> Path:
    """The state dir ``make slurm`` uses when run from the repo (honours CLUSTERFLOW_HOME)."""
    home = os.environ.get("CLUSTERFLOW_HOME")
    return (Path(home).resolve() if home else REPO / ".clusterflow") / "slurm"


def run_up(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m infra.clusters.slurm_local up`` exactly as ``make slurm`` runs it."""
    return subprocess.run([sys.executable, "-m", "infra.clusters.slurm_local", "up", *args],
                          cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def ensure_local_slurm() -> LocalSlurm:
    """Install (as root, if missing) and start the local Slurm; fail loudly, never skip."""
    proc = run_up("--state-dir", str(state_dir()))
    assert proc.returncode == 0, f"`python -m infra.clusters.slurm_local up` failed:\n{proc.stderr}"
    return LocalSlurm(state_dir())
