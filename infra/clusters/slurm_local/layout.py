"""Names, ports and paths of one local Slurm: everything it uses lives below one state dir.

Pure data (no processes started here), so clients that only need ``SLURM_CONF`` (`slurm_env`)
or the state dir's rule (`default_state_dir`) import nothing heavier than pydantic.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from rich.console import Console

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "libpmix-dev")
COMMANDS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sacct", "sinfo",
            "srun", "munged", "mungekey", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "local"
CLUSTER_NAME = "clusterflow"
DEFAULT_PORTS = (6817, 6818)  # Slurm's own defaults, used when free
# Node states in which the node is usable; anything else (down, drain, fail, "*" = not
# responding) means it is not, yet or at all.
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}
INSTALL_HINT = ("apt-get install -y --no-install-recommends " + " ".join(PACKAGES))

console = Console(stderr=True, highlight=False)


class LocalSlurmError(RuntimeError):
    """The local Slurm cannot be installed, started or reached; the message says what to do."""


def default_state_dir() -> Path:
    # The rule of infra.aws.embedded.state_dir(), not imported from there: that module pulls
    # in boto3, which `make slurm` does not need.
    return Path(os.environ.get("CLUSTERFLOW_HOME", ".clusterflow")).resolve() / "slurm"


def slurm_env(state_dir: Path | str | None = None) -> dict[str, str]:
    """The environment additions that point Slurm's commands at the local cluster.

    Only the additions: merge them over ``os.environ`` (``{**os.environ, **slurm_env()}``).
    """
    root = Path(state_dir) if state_dir is not None else default_state_dir()
    return {"SLURM_CONF": str(root.resolve() / "slurm.conf")}


class Settings(BaseModel):
    """What must stay stable across ``up`` calls: recorded in ``<state dir>/cluster.json``."""

    model_config = ConfigDict(extra="forbid")

    ctld_port: int
    slurmd_port: int
    state_save_location: Path
    user: str


@dataclass(frozen=True)
class Layout:
    """Every path the local cluster uses, all below one state dir."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def settings(self) -> Path:
        return self.root / "cluster.json"

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket_dir(self) -> Path:
        """Outside the state dir on purpose: munged refuses a socket below any directory that
        is not executable by all (a 0700 home, pytest's tmp dirs), and a socket path must fit
        in 108 bytes. One per user and state dir, so instances never share a munged."""
        tag = f"{zlib.crc32(str(self.root).encode()):08x}"
        return Path("/tmp") / f"clusterflow-munge-{os.geteuid()}-{tag}"

    @property
    def munge_socket(self) -> Path:
        return self.munge_socket_dir / "munge.socket"

    @property
    def munge_key(self) -> Path:
        return self.munge_dir / "munge.key"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def slurmd_spool(self) -> Path:
        """slurmstepd binds Unix sockets here (``<node>_<job>.<step>``, ~25 bytes) and a socket
        path must fit in 108 bytes: a deep state dir (a CI checkout) gets a short one in /tmp,
        named like the munge socket dir."""
        spool = self.spool / "slurmd"
        if len(str(spool)) <= 70:
            return spool
        tag = f"{zlib.crc32(str(self.root).encode()):08x}"
        return Path("/tmp") / f"clusterflow-slurmd-{os.geteuid()}-{tag}"

    @property
    def mpi_conf(self) -> Path:
        """Slurm reads ``mpi.conf`` from the directory of ``slurm.conf``."""
        return self.root / "mpi.conf"

    @property
    def pmix_tmp(self) -> Path:
        """The PMIx plugin's client directories (``spmix_appdir_<uid>_<job>.<step>``), one
        folder per cluster. Slurm's default is /tmp itself, where a directory left by one
        cluster's job 2 (a step killed mid-launch) fails the launch of the next cluster's job
        2 with "File exists" (``task N launch failed: Unspecified error``): every fresh local
        cluster, a CI checkout's included, numbers its jobs from 1. Short, like the slurmd
        spool: PMIx puts Unix sockets below it."""
        tag = f"{zlib.crc32(str(self.root).encode()):08x}"
        return Path("/tmp") / f"clusterflow-pmix-{os.geteuid()}-{tag}"

    @property
    def jobcomp(self) -> Path:
        return self.log_dir / "jobcomp.log"

    @property
    def default_state_save(self) -> Path:
        return self.root / "ctld-state"

    def pid_file(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.log_dir / f"{daemon}.log"

    def marker(self, daemon: str) -> str:
        """A string in the daemon's command line that says it is ours, not another Slurm's."""
        return str(self.munge_key if daemon == "munged" else self.conf)
