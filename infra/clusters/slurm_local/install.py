"""Installing Debian's Slurm and munge when they are missing (as root, with apt-get)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable

from infra.clusters.slurm_local.layout import (
    COMMANDS,
    INSTALL_HINT,
    PACKAGES,
    LocalSlurmError,
    console,
)
from infra.clusters.slurm_local.processes import _run


def missing_commands() -> list[str]:
    return [c for c in COMMANDS if shutil.which(c) is None]


def missing_packages() -> list[str]:
    if shutil.which("dpkg-query") is None:
        return []
    missing = []
    for pkg in PACKAGES:
        proc = _run(["dpkg-query", "-W", "-f", "${Status}", pkg])
        if proc.returncode != 0 or not proc.stdout.endswith(" installed"):
            missing.append(pkg)
    return missing


def _apt(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    return _run(["apt-get", *args], env=env, timeout=900)


def install(packages: Iterable[str]) -> None:
    """Install Debian's Slurm and munge; ``apt-get update`` once, only if apt needs it."""
    packages = list(packages)
    if not packages:
        return
    if os.geteuid() != 0:
        raise LocalSlurmError(
            f"Slurm is not installed ({', '.join(packages)} missing) and installing it needs "
            f"root: run `sudo {INSTALL_HINT}` (or `sudo make slurm`), then `make slurm` again")
    if shutil.which("apt-get") is None:
        raise LocalSlurmError(
            "Slurm is not installed and this is not a Debian-like system (no apt-get): install "
            "Slurm (slurmctld, slurmd, client commands) and munge with your package manager")
    console.print(f"installing {' '.join(packages)} (apt-get) ...")
    t0 = time.monotonic()
    updated = False
    policy = _run(["apt-cache", "policy", *packages])
    if "Candidate: (none)" in policy.stdout or policy.stdout.count("Candidate:") < len(packages):
        _apt(["update", "-q"])
        updated = True
    install_cmd = ["install", "-y", "-q", "--no-install-recommends", *packages]
    proc = _apt(install_cmd)
    if proc.returncode != 0 and not updated:  # stale package lists: refresh once, try again
        _apt(["update", "-q"])
        proc = _apt(install_cmd)
    if proc.returncode != 0:
        raise LocalSlurmError(f"`apt-get {' '.join(install_cmd)}` failed:\n"
                              f"{(proc.stderr or proc.stdout)[-2000:]}")
    console.print(f"installed in {time.monotonic() - t0:.0f} s")
