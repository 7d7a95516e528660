"""Writing the local Slurm's configuration: the recorded settings (ports, StateSaveLocation, user)
and the ``slurm.conf`` rendered from them. Nothing here starts or stops a daemon; the lifecycle
(`infra.clusters.slurm_local.cluster`) decides when a changed config means a restart.
"""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

from infra.backends.shell_safety import control_char, describe_char
from infra.clusters.slurm_local.layout import (
    CLUSTER_NAME,
    PARTITION,
    Layout,
    LocalSlurmError,
    Settings,
)
from infra.clusters.slurm_local.processes import _pick_ports, _run


def load_settings(lay: Layout, state_save: Path | None) -> Settings:
    """The recorded settings, created on first use; a new StateSaveLocation is recorded."""
    try:
        current = Settings.model_validate_json(lay.settings.read_text())
    except (OSError, ValueError):
        ctld, slurmd = _pick_ports(lay.root)
        current = Settings(ctld_port=ctld, slurmd_port=slurmd,
                           state_save_location=lay.default_state_save,
                           user=pwd.getpwuid(os.geteuid()).pw_name)
    if state_save and state_save != current.state_save_location:
        current = current.model_copy(update={"state_save_location": state_save})
    return current


def save_settings(lay: Layout, s: Settings) -> None:
    lay.settings.write_text(s.model_dump_json(indent=2) + "\n")


def node_line() -> str:
    """``slurmd -C``: this machine's real CPUs, sockets and memory, as a NodeName line."""
    proc = _run(["slurmd", "-C"], check=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("NodeName=")), None)
    if line is None:
        raise LocalSlurmError(f"`slurmd -C` printed no NodeName line: {proc.stdout!r}")
    return line.strip()


def render_mpi(lay: Layout) -> str:
    """``mpi.conf``: the PMIx plugin's client directories under this cluster's own folder."""
    line = f"PMIxCliTmpDirBase={lay.pmix_tmp}"
    if control_char(line) is not None:
        raise LocalSlurmError(f"mpi.conf line {line!r:.120} contains a control character")
    return ("# Written by clusterflow (python -m infra.clusters.slurm_local up); "
            "rewritten on every up.\n" + line + "\n")


def render(lay: Layout, s: Settings, node_line: str) -> str:
    """The whole slurm.conf; ``node_line`` is `node_line()` (passed in so this stays pure)."""
    host = socket.gethostname().split(".")[0]
    lines = [
        "# Written by clusterflow (python -m infra.clusters.slurm_local up); "
        "rewritten on every up.",
        f"ClusterName={CLUSTER_NAME}",
        # Explicit loopback addresses: a fresh container's hostname may not resolve.
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={s.ctld_port}",
        f"SlurmdPort={s.slurmd_port}",
        f"SlurmUser={s.user}",
        f"SlurmdUser={s.user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={lay.munge_socket}",
        f"StateSaveLocation={s.state_save_location}",
        f"SlurmdSpoolDir={lay.slurmd_spool}",
        f"SlurmctldPidFile={lay.pid_file('slurmctld')}",
        f"SlurmdPidFile={lay.pid_file('slurmd')}",
        f"SlurmctldLogFile={lay.log_file('slurmctld')}",
        f"SlurmdLogFile={lay.log_file('slurmd')}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        # Allocate at submit instead of waiting for the next scheduling pass (up to 3 s).
        "SchedulerParameters=batch_sched_delay=0",
        # Keep finished jobs in the controller for an hour (default 300 s), so status
        # polls can always see how a job ended.
        "MinJobAge=3600",
        "KillWait=10",
        # Refuse at submit what can never run (too many CPUs, a missing partition) instead
        # of leaving it pending forever with Reason=PartitionConfig.
        "EnforcePartLimits=ALL",
        "ReturnToService=2",
        "MpiDefault=none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        # `sacct -c` reads this when the controller has forgotten a job.
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={lay.jobcomp}",
        f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    for line in lines:
        # A newline in a path (state dir, CLUSTERFLOW_HOME) would add a config line of its
        # own, e.g. a Prolog= that slurmd runs as root.
        found = control_char(line)
        if found is not None:
            raise LocalSlurmError(f"slurm.conf line {line!r:.120} contains "
                                  f"{describe_char(found[1])}: use a state dir whose "
                                  "path has no control characters")
    return "\n".join(lines) + "\n"
