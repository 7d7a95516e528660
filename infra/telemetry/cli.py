"""``clusterflow telemetry show RUN``: where a run's time went, per rank, from S3."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from infra.aws.clients import AwsConfigError, AwsTarget
from infra.telemetry.provision import TelemetryConfig

telemetry_app = typer.Typer(add_completion=False, no_args_is_help=True,
                            help="Run telemetry (per-rank progress in S3).")
err = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def _target(mode: str, region: str) -> Iterator[AwsTarget]:
    from infra.aws.embedded import aws_target, recorded_server

    if mode not in ("embedded", "real"):
        err.print(f"[red]error:[/] --aws must be 'embedded' or 'real', not {mode!r}")
        raise typer.Exit(2)
    if mode == "embedded" and not os.environ.get("AWS_ENDPOINT_URL") and not recorded_server():
        err.print("[red]error:[/] no running AWS endpoint to read from: start one with "
                  "`clusterflow local up`, set AWS_ENDPOINT_URL, or use --aws real")
        raise typer.Exit(2)
    try:
        with aws_target(mode, region) as aws:  # type: ignore[arg-type]
            yield aws
    except AwsConfigError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None


@telemetry_app.command()
def show(
    run_id: Annotated[str, typer.Argument(help="The run id (CLUSTERFLOW_RUN_ID of the run).")],
    bucket: Annotated[str, typer.Option(help="Bucket Firehose delivers to.")] =
        TelemetryConfig().bucket,
    aws: Annotated[str, typer.Option("--aws", help="'embedded' or 'real'.")] = "embedded",
    region: Annotated[str | None, typer.Option(help="AWS region.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    png: Annotated[Path | None, typer.Option("--png", help="Write the timelines here.")] = None,
) -> None:
    """Per-rank timelines, load imbalance (slowest rank / mean), the slowest rank and step."""
    from infra.telemetry.reader import plot, read_run

    region = region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    with _target(aws, region) as target:
        try:
            summary, records = read_run(target, bucket, run_id)
        except Exception as e:  # noqa: BLE001 - an unreadable bucket is a one-line error
            err.print(f"[red]error:[/] cannot read s3://{bucket}/telemetry/run_id={run_id}/: "
                      f"{type(e).__name__}: {e}", highlight=False)
            raise typer.Exit(1) from None
    if not summary.records:
        err.print(f"[red]error:[/] no telemetry for run {run_id} in s3://{bucket}/telemetry/ "
                  "(Firehose delivers after its buffer interval; check the run id)")
        raise typer.Exit(1)
    if png is not None:
        plot(summary, records, str(png))
    if as_json:
        sys.stdout.write(json.dumps(summary.model_dump()) + "\n")
        return
    out = Console(soft_wrap=True)
    if not summary.registered:
        out.print(f"[yellow]warning:[/] run {run_id} is not a run clusterflow started; "
                  "its records are shown but flagged")
    table = Table("rank", "host", "steps", "seconds", "s/step", "halo wait s", "MB moved",
                  "peak RSS MB", box=None)
    for r in summary.ranks:
        table.add_row(str(r.rank), r.host or "", str(r.steps), f"{r.seconds:.3f}",
                      f"{r.mean_step_seconds:.6f}", f"{r.wait_seconds:.3f}",
                      f"{r.bytes / 1e6:.1f}", f"{(r.rss_bytes or 0) / 1e6:.0f}")
    out.print(table)
    imb = f"{summary.load_imbalance:.3f}" if summary.load_imbalance is not None else "n/a"
    out.print(f"load imbalance    {imb} (slowest rank / mean)")
    out.print(f"slowest rank      {summary.slowest_rank}")
    if summary.slowest_step:
        s = summary.slowest_step
        out.print(f"slowest step      {s['step']} on rank {s['rank']} ({s['seconds']:.6f} s)")
    out.print(f"records           {summary.records} in {summary.objects} object(s)"
              + (f", {summary.other} not per-step" if summary.other else ""))
    if png is not None:
        out.print(f"timelines         {png}")
