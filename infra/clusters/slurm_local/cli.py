"""``python -m infra.clusters.slurm_local up|down|status`` (and ``clusterflow slurm ...``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from infra.clusters.slurm_local.cluster import LocalSlurm
from infra.clusters.slurm_local.layout import LocalSlurmError, console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A real single-node Slurm on this machine (for the slurm backend).")

StateDirOpt = Annotated[Path | None, typer.Option(
    "--state-dir", help="Where config, keys, spool, logs and state live.",
    show_default="$CLUSTERFLOW_HOME/slurm")]  # typer renders it; "[...]" in help is markup


@app.command()
def up(
    state_dir: StateDirOpt = None,
    state_save_location: Annotated[Path | None, typer.Option(
        help="slurmctld's StateSaveLocation (kept across ups once set).",
        show_default="<state dir>/ctld-state")] = None,
    install_missing: Annotated[bool, typer.Option(
        "--install/--no-install", help="apt-get install Slurm and munge when missing (root).",
    )] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the node.")] = 60,
) -> None:
    """Install (as root, when missing) and start Slurm; idempotent."""
    cluster = LocalSlurm(state_dir, state_save_location)
    t0 = time.monotonic()
    try:
        done = cluster.up(install_missing=install_missing, timeout=timeout)
    except LocalSlurmError as e:
        console.print(f"[red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    name, state = done["node"]
    what = ("already running" if not (done["started"] or done["restarted"]) else
            ", ".join([f"started {d}" for d in done["started"]]
                      + [f"restarted {d}" for d in done["restarted"]]))
    console.print(f"[green]Slurm is up[/] ({what}; node {name} {state}, "
                  f"{time.monotonic() - t0:.1f} s)")
    console.print(f"use it with: export SLURM_CONF={cluster.layout.conf}")


@app.command()
def down(
    state_dir: StateDirOpt = None,
    keep_jobs: Annotated[bool, typer.Option(
        help="Do not cancel queued/running jobs first.")] = False,
) -> None:
    """Cancel the jobs, then stop the daemons `up` started (by their pid files)."""
    stopped = LocalSlurm(state_dir).down(cancel_jobs=not keep_jobs)
    console.print(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@app.command()
def status(state_dir: StateDirOpt = None) -> None:
    """Print the cluster's state as JSON; exit 0 when it is up, 1 otherwise."""
    info = LocalSlurm(state_dir).status()
    sys.stdout.write(json.dumps(info, indent=2) + "\n")
    raise typer.Exit(0 if info["up"] else 1)
