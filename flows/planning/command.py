"""``clusterflow plan SPEC``: the resources and the cost of a run, before it runs.

Read-only by construction: it loads the spec (every refusal a run would give), prices the
step graph offline, and asks the endpoint only describe/get/head calls. It never starts an
embedded endpoint of its own: without a running one (``clusterflow local up``) or
``AWS_ENDPOINT_URL``, an embedded run starts from an empty endpoint, so everything is created.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from flows.spec import DEFAULT_SPEC, PipelineSpec, SpecError, load_spec

err = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def _target(spec: PipelineSpec, offline: bool) -> Iterator[tuple[Any, str, str, bool]]:
    """(aws or None, why nothing was checked, endpoint label, fresh embedded endpoint)."""
    from infra.aws.clients import AwsConfigError, AwsTarget, real_target
    from infra.aws.embedded import recorded_server

    if offline:
        yield None, "not checked (--offline)", "no endpoint (--offline)", False
        return
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    if spec.aws == "real":
        try:
            aws = real_target(spec.region)
        except AwsConfigError as e:
            yield None, f"not checked: {e}", "AWS (no credentials)", False
            return
        yield aws, "", aws.label, False
    elif endpoint:
        aws = AwsTarget(region=spec.region, endpoint_url=endpoint, embedded=False)
        yield aws, "", aws.label, False
    else:
        url = recorded_server()
        if url:
            aws = AwsTarget(region=spec.region, endpoint_url=url, embedded=True)
            yield aws, "", aws.label, False
        else:
            yield None, "", "a fresh embedded AWS (moto) started by the run: all is created", \
                True


def build(spec: PipelineSpec, spec_path: Path, prices: Path | None,
          offline: bool, aws: Any = None, *, live: bool = False,
          clients: Any = None) -> dict[str, Any]:
    """The plan as a dict (``--json``); ``aws``: check against this target instead;
    ``live``: instance prices from AWS (``clients`` makes the clients, for tests)."""
    from flows.budget import run_estimate
    from flows.planning.resources import inventory

    est = run_estimate(spec, spec_path, prices, live=live and not offline, clients=clients)
    if live and offline:
        est.price_notes.insert(0, "live prices not read (--offline): the table's prices")
    if aws is not None:
        resources, reason, label, fresh = inventory(spec, aws), "", aws.label, False
    else:
        with _target(spec, offline) as (aws, reason, label, fresh):
            resources = inventory(spec, aws, reason, fresh=fresh)
    out: dict[str, Any] = {
        "spec": spec.name, "path": str(spec_path), "backend": spec.backend, "aws": label,
        "checked": aws is not None or fresh, "not_checked": reason,
        "resources": [asdict(r) for r in resources], "estimate": est.as_dict(),
    }
    if spec.budget is not None:
        fits = est.usd is not None and est.usd <= spec.budget.max_usd
        out["budget"] = {"max_usd": spec.budget.max_usd, "fits": fits}
    return out


def _money(v: float | None) -> str:
    return "unknown" if v is None else f"{v:,.2f}"


def _h(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}".rstrip("0").rstrip(".")


def render(plan: dict[str, Any]) -> None:
    """Plain aligned lines (no wrapping tables): a plan is read in terminals and in CI logs."""
    out = Console(soft_wrap=True, highlight=False)
    out.print(f"[bold]plan for {escape(plan['spec'])}[/] ({escape(plan['path'])}, backend "
              f"{plan['backend']})")
    out.print(f"resources on {escape(plan['aws'])}")
    if plan["not_checked"]:
        out.print(f"[yellow]{escape(plan['not_checked'])}[/]")
    for r in plan["resources"]:
        note = f"  ({r['note']})" if r["note"] else ""
        out.print(escape(f"  {r['action']:<9} {r['kind']:<31} {r['name']:<40} "
                         f"at end: {r['at_end']}{note}"))
    est = plan["estimate"]
    out.print("compute and storage")
    out.print(escape(f"  {'item':<40} {'instance':<15} {'nodes':>5} {'points':>6} "
                     f"{'par':>4} {'h/point':>8} {'wall h':>7} {'USD/h':>9} {'USD':>10}"))
    for ln in est["lines"]:
        compute = ln["kind"] == "compute"
        out.print(escape(
            f"  {ln['item']:<40} {ln['instance_type'] or '-':<15} "
            f"{ln['nodes'] if compute else '-':>5} {ln['points'] if compute else '-':>6} "
            f"{ln['parallel'] if compute else '-':>4} {_h(ln['hours']):>8} "
            f"{_h(ln['wall_hours']):>7} {ln['usd_per_hour']:>9.4f} {_money(ln['usd']):>10}"))
    wall = "unbounded" if est["wall_hours"] is None else f"<= {_h(est['wall_hours'])} h"
    out.print(f"[bold]estimate {_money(est['usd'])} USD[/] (all On-Demand "
              f"{_money(est['usd_on_demand'])} USD), wall time {wall}, at most "
              f"{est['usd_per_hour']:.4f} USD/h")
    out.print(f"prices as of {escape(est['prices_as_of'])} from "
              f"{escape(est['prices_source'])}")
    for n in est.get("price_notes", []):
        out.print(f"  prices: {escape(n)}")
    for a in est["assumptions"]:
        out.print(f"  assumes: {escape(a)}")
    for u in est["unknown"]:
        out.print(f"  [yellow]unknown:[/] {escape(u)}")
    if "budget" in plan:
        b = plan["budget"]
        verdict = ("fits" if b["fits"] else "[red]the run would be refused[/]")
        out.print(f"budget {b['max_usd']:g} USD: {verdict}")


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        spec: Annotated[Path, typer.Argument(help="Pipeline spec YAML.")] = DEFAULT_SPEC,
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
        prices: Annotated[Path | None, typer.Option(
            help="Price table JSON instead of the shipped one (same shape).")] = None,
        offline: Annotated[bool, typer.Option(
            help="Check nothing against an endpoint; say what could not be checked.")] = False,
        live: Annotated[bool, typer.Option(
            help="Instance prices from AWS now (Price List API, Spot price history), the "
                 "table's where AWS does not answer; needs AWS credentials.")] = False,
    ) -> None:
        """What a run would create, reuse and delete, and what it would cost; creates nothing."""
        from infra.clusters.prices import PriceError

        try:
            loaded = load_spec(spec)
            result = build(loaded, spec, prices, offline, live=live)
        except (SpecError, PriceError) as e:
            err.print(f"[red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None
        if as_json:
            sys.stdout.write(json.dumps(result) + "\n")
        else:
            render(result)
