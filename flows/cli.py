"""``clusterflow``: the command line. Thin: it parses, configures Prefect, calls the flows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows import fast_exit, phase_clock
from flows.budget import check_budget
from flows.cli_commands import LazyGroup
from flows.spec import DEFAULT_SPEC, SpecError, load_spec


class _App(typer.Typer):
    """The console script's app: a command that armed ``flows.fast_exit`` (a finished
    ``run``) ends the process without the interpreter's module teardown. ``CliRunner``
    invokes the click command directly, never this, so tests keep their process."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as e:
            if fast_exit.armed():
                phase_clock.mark("output")
                fast_exit.exit_now(e.code)
            raise


# Each area owns its commands; the CLI only names them and imports one when it is used
# (flows.cli_commands), so `clusterflow run` does not import the other areas' CLIs.
app = _App(add_completion=False, no_args_is_help=True, cls=LazyGroup,
                  help="HPC pipelines on AWS as Prefect flows.")
err = Console(stderr=True, soft_wrap=True)  # long paths and errors stay greppable


@app.callback()
def main() -> None:
    """HPC pipelines on AWS as Prefect flows (embedded local AWS by default)."""


def _summary(result: dict[str, Any]) -> None:
    out = Console(soft_wrap=True)
    out.print(f"[bold green]run {escape(result['run_id'])} succeeded[/] "
              f"({result['kernel']} on {result['ranks']} ranks, backend {result['backend']}, "
              f"{escape(result['aws'])})")
    table = Table("stage", "seconds", box=None)
    for stage, secs in result["seconds"].items():
        table.add_row(stage, f"{secs:.2f}")
    table.add_row("[bold]total[/]", f"{sum(result['seconds'].values()):.2f}")
    out.print(table)
    plain = {"markup": False}  # paths, keys, names: the user's text, never rich markup
    out.print(f"{result['result']:<17} sha256 {result['result_sha256']}", **plain)
    out.print(f"input             {result['s3']['input']} ({result['bytes_staged']} bytes staged)",
              **plain)
    out.print(f"results           {result['s3']['results']}", **plain)
    out.print(f"scratch           {result['scratch_dir']}", **plain)
    for q, r in result["fanout"]["queues"].items():
        out.print(f"queue {q:<12}{r['events_received']} event(s) received, "
                  f"{r['verified']} verified", **plain)
    if result.get("spot", {}).get("interruptions"):
        out.print(f"interrupted       {result['spot']['interruptions']} time(s), "
                  f"{result['spot']['seconds_lost']:.1f} s in interrupted attempts")


def _steps_summary(result: dict[str, Any]) -> None:
    """One table row per point, so a 64-point sweep stays readable."""
    out = Console(soft_wrap=True)
    pts = result["points"]
    ok = pts["total"] - pts["failed"]
    colour = "green" if not pts["failed"] else "red"
    out.print(f"[bold {colour}]run {escape(result['run_id'])} {result['state']}[/] "
              f"({ok}/{pts['total']} points completed, {escape(result['aws'])})")
    stages = Table("stage", "seconds", box=None)
    for stage, secs in result["seconds"].items():
        stages.add_row(stage, f"{secs:.2f}")
    out.print(stages)
    table = Table("step", "point", "state", "backend", "job", "seconds", "main output (sha256)",
                  box=None)
    for name, step in result["steps"].items():
        for p in step["points"]:
            first = p["outputs"][0] if p["outputs"] else None
            main = f"{first['name']} {first['sha256'][:12]}" if first else p.get("error", "")
            state = p["state"] if p.get("computed_by") in (None, result["run_id"]) \
                else f"{p['state']} (from {p['computed_by']})"
            style = "" if p["state"] in ("completed", "reused") else "red"
            table.add_row(escape(name), escape(p["point"] or "-"), state,
                          p.get("backend") or "-", p.get("job_id") or "-",
                          f"{p['seconds']:.2f}" if p.get("seconds") is not None else "-",
                          escape(main), style=style)
    out.print(table)
    for name, step in result["steps"].items():  # requeues after a Spot reclaim, per point
        for p in step["points"]:
            if p.get("spot"):
                where = f"{name}/{p['point']}" if p["point"] else name
                out.print(f"interrupted       {where}: {p['spot']['interruptions']} time(s), "
                          f"{p['spot']['seconds_lost']:.1f} s in interrupted attempts",
                          markup=False)
    out.print(f"manifest          {result['s3']['manifest']} sha256 {result['result_sha256']}")
    out.print(f"scratch           {result['scratch_dir']}")
    for q, r in result["fanout"]["queues"].items():
        out.print(f"queue {q:<12}{r['events_received']} event(s) received, "
                  f"{r['verified']} verified")


@app.command()
def run(
    spec: Annotated[Path, typer.Option(help="Pipeline spec YAML.")] = DEFAULT_SPEC,
    ranks: Annotated[int | None, typer.Option(help="MPI ranks (overrides the spec).")] = None,
    backend: Annotated[str | None, typer.Option(
        help="Where ranks run: local | slurm | parallelcluster | batch (overrides the spec)."
    )] = None,
    aws: Annotated[str | None, typer.Option(
        help="'embedded' (local moto, the default) or 'real' (your AWS account).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only the read-only checks against the account; create nothing.")
    ] = False,
) -> None:
    """Run a pipeline spec end to end: provision, stage in, MPI run, publish, fan out, consume."""
    phase_clock.mark("python start, CLI imports")
    from flows.run_preflight import check_before_start

    try:
        # Refuse a bad spec before anything starts.
        loaded = load_spec(spec, ranks=ranks, aws=aws, backend=backend)
        check_budget(loaded, spec)
        phase_clock.mark("spec load and validation")
    except SpecError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    if loaded.aws == "real":  # credentials are checked offline, before Prefect starts
        from infra.aws.credentials import real_aws_problem

        if (problem := real_aws_problem()) is not None:
            err.print(f"[red]error:[/] {escape(f'{spec}: {problem}')}", highlight=False)
            raise typer.Exit(2)
    try:  # and what cannot work with it: region, endpoint, input_key (flows/run_preflight.py)
        check_before_start(loaded, spec)
    except SpecError as e:
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    phase_clock.mark("preflight")
    if dry_run:
        from flows.planning.dryrun import dry_run as check_only

        raise typer.Exit(check_only(loaded, spec, as_json))

    from flows import prefect_runtime
    from flows.signals import exit_on_interrupt, terminate_like_interrupt
    from infra.aws.embedded import state_dir

    # SIGTERM/SIGHUP unwind like Ctrl-C and the temporary Prefect server is ours to stop:
    # no process this run starts outlives it (the rest die with it even on SIGKILL).
    with terminate_like_interrupt(), exit_on_interrupt(err), \
            prefect_runtime.temporary_server(state_dir()) as server:
        from flows import prefect_tls
        from flows.pipeline import hpc_pipeline
        from flows.steps.flow import PipelineFailed

        prefect_tls.install()  # one CA bundle load for the run's Prefect clients, not one each
        code = 0
        phase_clock.mark("Prefect and pipeline imports")
        try:
            if server is not None:
                server.wait_ready()
            from flows import prewarm

            prewarm.start(loaded)  # boto3 clients built while Prefect creates the flow run
            with prefect_runtime.without_heartbeat():  # the caller watches a CLI run
                result = hpc_pipeline(spec_path=str(spec), ranks=ranks, aws_mode=aws,
                                      backend=backend)
        except PipelineFailed as e:  # some points failed: the summary still says what happened
            result, code = e.summary, 1
            err.print(f"[red]error:[/] pipeline failed: {escape(str(e))}", highlight=False)
        except prefect_runtime.PrefectServerError as e:
            err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(1) from None
        except Exception as e:  # the flow already logged the traceback through Prefect
            err.print(f"[red]error:[/] pipeline failed: {type(e).__name__}: {escape(str(e))}",
                      highlight=False)
            raise typer.Exit(1) from None
        phase_clock.mark("flow-run teardown")
    # Everything this run started has stopped: the process may skip the interpreter's
    # teardown once the summary is out (flows.fast_exit).
    fast_exit.arm()
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    elif "steps" in result:
        _steps_summary(result)
    else:
        _summary(result)
    if code:
        raise typer.Exit(code)


if __name__ == "__main__":
    app()
