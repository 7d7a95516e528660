"""Where a cluster's shell commands run: the protocol, and the local implementation.

The ParallelCluster provider and the idle teardown send small bash scripts to the head node.
``infra.backends.ssm.SsmShell`` sends them through SSM Run Command; ``LocalShell`` runs them
with bash on this machine, for when clusterflow itself runs on the head node (or any Slurm
submit host).
Both return the same ``CommandResult``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class CommandResult:
    status: str  # SSM's words: Success, Failed, Cancelled, TimedOut, ...
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == "Success" and self.exit_code == 0


class RemoteShell(Protocol):
    def run(self, script: str, *, comment: str = "clusterflow") -> CommandResult: ...


class RemoteCommandError(RuntimeError):
    """The command could not be run, followed, or it failed; the message carries its stderr."""


@dataclass(frozen=True)
class LocalShell:
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 600

    def run(self, script: str, *, comment: str = "clusterflow") -> CommandResult:
        try:
            proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                                  env={**os.environ, **self.env}, timeout=self.timeout_s,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            return CommandResult("TimedOut", -1, str(e.stdout or ""), str(e.stderr or ""))
        return CommandResult("Success" if proc.returncode == 0 else "Failed", proc.returncode,
                             proc.stdout, proc.stderr)


def run_checked(shell: RemoteShell, script: str, *, what: str) -> CommandResult:
    """``shell.run`` that raises with the remote stderr when the script fails."""
    result = shell.run(script, comment=what)
    if not result.ok:
        detail = (result.stderr or result.stdout).strip()[-2000:]
        raise RemoteCommandError(f"{what} failed ({result.status}, exit {result.exit_code}): "
                                 f"{detail}")
    return result
