"""A real single-node Slurm on this machine (Debian's Slurm 22.05), for the slurm backend's tests:
its paths (`layout`), config writing (`config`), installation (`install`), daemon lifecycle
(`cluster`) and CLI (`cli`, run as ``python -m infra.clusters.slurm_local up|down|status``).
It never touches /etc or /run and never stops a daemon it did not start.
"""

from __future__ import annotations

from infra.clusters.slurm_local.cli import app
from infra.clusters.slurm_local.cluster import LocalSlurm
from infra.clusters.slurm_local.install import install, missing_commands, missing_packages
from infra.clusters.slurm_local.layout import (
    PARTITION,
    Layout,
    LocalSlurmError,
    Settings,
    default_state_dir,
    slurm_env,
)

__all__ = ["PARTITION", "Layout", "LocalSlurm", "LocalSlurmError", "Settings", "app",
           "default_state_dir", "install", "missing_commands", "missing_packages", "slurm_env"]
