"""``clusterflow ha ...``: head-node high availability commands (mounted as a sub-app).

``ha_app`` is mounted by ``flows/cli.py`` with ``app.add_typer(ha_app, name="ha")``; it also runs
alone as ``python -m infra.ha.cli``.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

ha_app = typer.Typer(add_completion=False, no_args_is_help=True,
                     help="Head-node high availability: recovery designs and their drill.")
err = Console(stderr=True, highlight=False)


class DesignChoice(str, enum.Enum):
    standby = "standby"
    asg = "asg"


@ha_app.callback()
def main() -> None:
    """Head-node high availability (standby instance or Auto Scaling group)."""


def _summary(r: dict) -> None:
    out = Console(soft_wrap=True, highlight=False)
    ok = r["jobs_lost"] == 0
    out.print(f"[bold {'green' if ok else 'red'}]{r['design']} drill: "
              f"{'no job lost' if ok else str(r['jobs_lost']) + ' job(s) lost'}[/] "
              f"(cluster {r['cluster']}, {r['aws']})")
    out.print(f"head {r['old_instance']} ({r['old_az']}) -> {r['new_instance']} ({r['new_az']}),"
              f" EIP {r['eip']}")
    out.print(f"RTO {r['rto_seconds']:.2f} s (kill -> EIP on the new head and slurmctld "
              f"answering)")
    at = r["jobs_at_failure"]
    out.print(f"jobs: {r['jobs_before']} submitted ({at['RUNNING']} running, {at['PENDING']} "
              f"queued at the failure), {r['jobs_completed']} completed")
    table = Table("phase", "seconds", box=None)
    for phase, secs in r["seconds"].items():
        table.add_row(phase, f"{secs:.2f}")
    out.print(table)
    out.print("played by the drill where the emulator has no behaviour:")
    for name, what in r["emulated"].items():
        out.print(f"  {name}: {what}")


@ha_app.command()
def drill(
    design: Annotated[DesignChoice, typer.Option(help="Recovery design to drill.")] = (
        DesignChoice.standby),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    jobs: Annotated[int | None, typer.Option(
        min=1, max=200, help="Jobs to submit (default: CPUs + 2, so some are queued).")] = None,
    job_seconds: Annotated[float, typer.Option(
        min=0.5, help="How long each job runs (longer than Slurm's ~5 s state-save delay "
        "keeps jobs running and queued at the failure).")] = 8.0,
    lose_az: Annotated[bool, typer.Option(
        "--lose-az/--same-az", help="asg: the replacement lands in the other AZ.")] = True,
    region: Annotated[str, typer.Option(help="Region of the embedded endpoint.")] = "us-east-1",
    workdir: Annotated[Path | None, typer.Option(
        help="Where the drill's Slurm, volumes and snapshots live "
        "(default: $CLUSTERFLOW_HOME/ha).")] = None,
    keep: Annotated[bool, typer.Option(help="Keep the drill's files for inspection.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for recovery and jobs.")] = 180,
) -> None:
    """Kill the head node under a real Slurm queue, recover it, and count the jobs.

    Exit 0: no job lost. 1: some were (the JSON still says which). 2: the drill could not run.
    """
    import logging

    from rich.logging import RichHandler

    from infra.aws.embedded import aws_target
    from infra.clusters.slurm_local.layout import LocalSlurmError
    from infra.ha.drill import DrillError, DrillOptions, run_drill

    logging.basicConfig(level=logging.WARNING, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err, show_path=False)])
    logging.getLogger("clusterflow").setLevel(logging.INFO)
    jobs = jobs or (os.cpu_count() or 2) + 2
    opts = DrillOptions(design=design.value, region=region, jobs=jobs, job_seconds=job_seconds,
                        lose_az=lose_az, workdir=workdir, keep=keep, timeout_s=timeout)
    try:
        with aws_target("embedded", region) as target:
            result = run_drill(target, opts)
    except (DrillError, LocalSlurmError) as e:
        err.print(f"[red]error:[/] drill could not run: {e}")
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        _summary(result)
    if result["jobs_lost"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    ha_app()
