"""``clusterflow local up|down|status`` and ``clusterflow deploy``.

Mount with ``register(app)`` (adds ``deploy``) and ``app.add_typer(local_app, name="local")``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.spec import DEFAULT_SPEC, SpecError

local_app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="A local stack in the background: Prefect server, moto, a process worker and the "
         "event consumers, with state and logs under $CLUSTERFLOW_HOME (default .clusterflow).")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _home() -> Path:
    from infra.aws.embedded import state_dir

    return state_dir()


def _fail(message: str, code: int = 1) -> typer.Exit:
    # Escaped: paths and quoted patterns keep their [brackets] (rich would eat them).
    err.print(f"[red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _refuse_bad_inputs(spec: Path, fabric: Path) -> None:
    """The spec and fabric ``up`` would use, refused (exit 2) before anything starts."""
    from event_bridge.fabric import FabricError, load_fabric
    from flows.spec import load_spec
    from infra.aws.clients import AwsConfigError
    from infra.aws.reachability import check_region

    try:
        loaded = load_spec(spec)
        check_region(loaded.region, field=f"pipeline spec {spec}: region")
        load_fabric(fabric)
    except (SpecError, FabricError, AwsConfigError) as e:
        raise _fail(str(e), 2) from None


def _print_status(report: dict[str, Any]) -> None:
    colour = {"running": "green", "degraded": "yellow", "stopped": "red"}[report["state"]]
    out.print(f"local stack [{colour}]{report['state']}[/] ({escape(report['home'])})")
    if not report["components"]:
        return
    table = Table("component", "state", "pid", "url", box=None)
    for name, c in report["components"].items():
        state = "running" if c["running"] else "[red]not running[/]"
        if c.get("healthy") is False:
            state = "[yellow]running, not answering[/]"
        table.add_row(escape(name), state, str(c.get("pid", "")), escape(c.get("url", "")))
    out.print(table)
    # Plain text from here: names and paths are the user's, never rich markup.
    out.print(f"database  {report.get('database') or 'sqlite'}", markup=False)
    out.print(f"work pool {report['work_pool']}", markup=False)
    out.print(f"spec      {report['spec']}", markup=False)
    out.print(f"fabric    {report['fabric']}", markup=False)
    for consumer in report["consumers"]:
        out.print(f"consumer  {consumer}", markup=False)
    out.print(f"logs      {Path(report['home']) / 'logs'}", markup=False)
    if report["state"] == "running":
        out.print(f"\nexport PREFECT_API_URL={report['prefect_api_url']}   "
                  "# to use it from prefect's own CLI", markup=False)


@local_app.command()
def up(
    spec: Annotated[Path, typer.Option(
        help="Spec whose buckets and fan-out topic the event consumers watch.")] = DEFAULT_SPEC,
    port: Annotated[int | None, typer.Option(
        help="Prefect server port (default: a free one).")] = None,
    pool: Annotated[str | None, typer.Option(
        help="Work pool for the worker (default: the one prefect.yaml names).")] = None,
    fabric: Annotated[Path | None, typer.Option(
        help="Event fabric YAML to apply and consume (default: event_bridge/fabric.yaml).")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Start the local stack in the background (a no-op if it already runs)."""
    from event_bridge.fabric import DEFAULT_FABRIC
    from flows import local_stack

    home = _home()
    _refuse_bad_inputs(spec, fabric or DEFAULT_FABRIC)
    try:
        _, started = local_stack.up(home, spec, port=port, work_pool=pool,
                                    fabric_path=fabric or DEFAULT_FABRIC)
    except (local_stack.StackError, SpecError) as e:
        raise _fail(str(e)) from None
    report = local_stack.status(home)
    report["started"] = started
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    if not started:
        out.print("[yellow]the local stack is already running[/]")
    _print_status(report)
    if started:
        out.print("next: `clusterflow deploy` registers the deployments")


@local_app.command()
def down(as_json: JsonFlag = False) -> None:
    """Stop exactly what `local up` started, with the flow runs and ranks they started."""
    from flows import local_stack

    try:
        report = local_stack.down(_home())
    except local_stack.StackError as e:
        raise _fail(str(e)) from None
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    elif not report["was_running"]:
        out.print(f"no local stack recorded in {report['home']}", markup=False)
    else:
        stopped = ", ".join(f"{n} ({pid})" for n, pid in report["stopped"].items())
        out.print(f"stopped {stopped}; {len(report['pids_signalled'])} process(es) signalled",
                  markup=False)
        if report["pids_killed"]:
            out.print(f"[yellow]{len(report['pids_killed'])} ignored SIGTERM and were "
                      f"killed: {report['pids_killed']}[/]")


@local_app.command()
def status(as_json: JsonFlag = False) -> None:
    """What the local stack runs. Exit code 0: running, 1: degraded, 3: stopped."""
    from flows import local_stack

    try:
        report = local_stack.status(_home())
    except local_stack.StackError as e:
        raise _fail(str(e)) from None
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _print_status(report)
    raise typer.Exit({"running": 0, "degraded": 1, "stopped": 3}[report["state"]])


# ---------------------------------------------------------------------------- deploy

def _api_url() -> str:
    from flows.local_stack import recorded_prefect_api

    url = os.environ.get("PREFECT_API_URL") or recorded_prefect_api(_home())
    if not url:
        raise _fail("no Prefect API to deploy to: start one with `clusterflow local up`, or "
                    "set PREFECT_API_URL (a Prefect server or Prefect Cloud workspace)", 2)
    if os.environ.get("PREFECT_API_URL"):
        from infra.aws.clients import AwsConfigError
        from infra.aws.reachability import check_endpoint

        try:
            check_endpoint(url, name="PREFECT_API_URL")
        except AwsConfigError as e:
            raise _fail(str(e), 2) from None
    return url


def _prefect_file(pool: str | None, workdir: Path) -> Path:
    from flows.local_stack import PREFECT_FILE

    if pool is None:
        return PREFECT_FILE
    # `prefect deploy --all` ignores --pool, so the pool goes into a derived prefect.yaml.
    doc = yaml.safe_load(PREFECT_FILE.read_text())
    for dep in doc["deployments"]:
        dep["work_pool"] = {**(dep.get("work_pool") or {}), "name": pool}
    path = workdir / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _describe(api_url: str, prefect_file: Path) -> list[dict[str, Any]]:
    """Read the file's deployments back from the API (by name and entrypoint)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    from flows.local_stack import prefect_api

    wanted = [(d["name"], d["entrypoint"])
              for d in yaml.safe_load(prefect_file.read_text())["deployments"]]
    found = []
    with prefect_api(api_url), get_client(sync_client=True) as client:
        listed = client.read_deployments(deployment_filter=DeploymentFilter(
            name=DeploymentFilterName(any_=[name for name, _ in wanted])))
        flows = {f.id: f.name for f in client.read_flows()}
        for name, entrypoint in wanted:
            d = next((d for d in listed if d.name == name and d.entrypoint == entrypoint),
                     None)
            if d is None:
                raise _fail(f"deployment {name} ({entrypoint}) is missing after deploy")
            automations = client.request(
                "GET", f"/automations/related-to/prefect.deployment.{d.id}").json()
            scheduled = not d.paused and any(s.active for s in d.schedules)
            next_runs = _schedule_now(client, d) if scheduled else []
            found.append({
                "name": f"{flows.get(d.flow_id, '?')}/{d.name}",
                "id": str(d.id),
                "entrypoint": d.entrypoint,
                "work_pool": d.work_pool_name,
                "schedules": [{"cron": getattr(s.schedule, "cron", None),
                               "timezone": getattr(s.schedule, "timezone", None),
                               "active": s.active} for s in d.schedules],
                "triggers": [{"name": a["name"], "enabled": a["enabled"],
                              "expect": a["trigger"].get("expect"),
                              "match": a["trigger"].get("match"),
                              "parameters": (a["actions"][0].get("parameters")
                                             if a["actions"] else None)}
                             for a in automations],
                "next_runs": next_runs,
            })
    return found


def _schedule_now(client: Any, deployment: Any) -> list[str]:
    """Have the server create the deployment's upcoming runs now, and list their start times.

    Prefect's scheduler service creates them on its next loop, up to a minute after deploy,
    so right after `clusterflow deploy` a user (or a check) would see no scheduled run. The
    server's schedule endpoint is idempotent (runs are keyed by deployment, schedule and
    time), so deploying twice does not double them.
    """
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import PrefectHTTPStatusError

    try:
        client.request("POST", f"/deployments/{deployment.id}/schedule", json={})
    except PrefectHTTPStatusError as e:
        # The deployment is registered either way; the server's scheduler makes the runs on
        # its next loop. Only the early listing is lost.
        err.print(f"[yellow]warning:[/] the server did not schedule "
                  f"{escape(deployment.name)}'s runs now ({e.response.status_code}); its "
                  "scheduler will within a minute")
        return []
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
            state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))),
        sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=3)
    return [r.expected_start_time.isoformat() for r in runs if r.expected_start_time]


@contextlib.contextmanager
def _prefect_api_errors(api_url: str) -> Iterator[None]:
    """An API that fails (or is not Prefect's) is one line naming it, never a traceback."""
    import httpx

    try:
        yield
    except httpx.HTTPError as e:
        raise _fail(f"the Prefect API at {api_url} failed: {type(e).__name__}: "
                    f"{' '.join(str(e).split())}") from None


def deploy(
    pool: Annotated[str | None, typer.Option(
        help="Work pool for every deployment (default: the one prefect.yaml names).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Register prefect.yaml's deployments (nightly, on-upload, on-result, guard-sweep).

    Targets PREFECT_API_URL if set, else the local stack's server.
    """
    from flows.local_stack import REPO, default_work_pool, ensure_work_pool

    api_url = _api_url()
    pool_name = pool or default_work_pool()
    # A missing pool is created as a `process` pool; an existing one (ECS, ...) is used as is.
    with _prefect_api_errors(api_url):
        ensure_work_pool(api_url, pool_name, require_process=False)
    env = {**os.environ, "PREFECT_API_URL": api_url}
    with tempfile.TemporaryDirectory(prefix="clusterflow-deploy-") as tmp:
        prefect_file = _prefect_file(pool, Path(tmp))
        # Run from the repository root: entrypoints are relative to it, and so is the
        # working directory prefect records for the process worker.
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all",
             "--prefect-file", str(prefect_file)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0:
            raise _fail(f"prefect deploy failed (exit {proc.returncode}):\n"
                        f"{(proc.stdout + proc.stderr)[-3000:]}")
        with _prefect_api_errors(api_url):
            deployments = _describe(api_url, prefect_file)
    if as_json:
        sys.stdout.write(json.dumps({"api_url": api_url, "work_pool": pool_name,
                                     "deployments": deployments}) + "\n")
        return
    table = Table(box=None)
    for column in ("deployment", "starts on", "work pool", "next run"):
        table.add_column(column, overflow="fold")  # wrap on narrow terminals, never elide
    for d in deployments:
        starts = [f"cron {s['cron']} {s['timezone']}" for s in d["schedules"]]
        starts += [f"event {', '.join(t['expect'] or [])} where "
                   + ", ".join(f"{k}={v}" for k, v in (t["match"] or {}).items())
                   for t in d["triggers"]]
        table.add_row(escape(d["name"]), escape("; ".join(starts) or "manual"),
                      escape(d["work_pool"]), d["next_runs"][0] if d["next_runs"] else "-")
    out.print(f"[bold green]registered {len(deployments)} deployments[/] with "
              f"{escape(api_url)}")
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)


if __name__ == "__main__":  # `python -m flows.local_cli local up`, before it is mounted
    _app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(_app)
    _app.add_typer(local_app, name="local")
    _app()
