"""``clusterflow guard``: block and unblock addresses, audit and lock down security groups.

Mounted by ``flows/cli.py`` as ``app.add_typer(guard_app, name="guard")``; also runnable as
``python -m infra.guard.cli``. Like ``clusterflow events`` it acts on ``AWS_ENDPOINT_URL``
when set, on the endpoint ``clusterflow local up`` recorded otherwise, and on your AWS
account with ``--aws real``. Exit 2: refused (nothing changed); exit 1: an AWS call failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console
from rich.table import Table

from infra.aws.clients import AwsConfigError
from infra.guard.cidr import GuardInputError, parse_ttl
from infra.guard.config import GuardConfig, GuardConfigError, load_guard_config
from infra.guard.nacl import NaclRefused
from infra.guard.registry import RegistryMissing
from infra.guard.service import Guard, GuardRefused
from infra.guard.waf import WafRefused

guard_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Block hostile addresses at the NACLs and WAF; audit security "
                             "groups.")
out = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)

REFUSED = (GuardRefused, GuardInputError, GuardConfigError, NaclRefused, WafRefused,
           RegistryMissing)
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="Guard config YAML (default: $CLUSTERFLOW_GUARD_CONFIG or ./guard.yaml).")]
AwsOpt = Annotated[str, typer.Option(
    "--aws", help="'embedded' (AWS_ENDPOINT_URL or `clusterflow local up`'s endpoint) or "
                  "'real'.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


@guard_app.callback()
def main() -> None:
    """IP blocking (NACL deny entries, WAF IP sets) and security-group lockdown."""


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/] {message}")
    return typer.Exit(code)


@contextlib.contextmanager
def _guard(config: Path | None, mode: str) -> Iterator[Guard]:
    from infra.aws.embedded import aws_target, recorded_server

    try:
        cfg: GuardConfig = load_guard_config(config)
    except GuardConfigError as e:
        raise _fail(str(e), 2) from None
    if mode not in ("embedded", "real"):
        raise _fail(f"--aws must be 'embedded' or 'real', not {mode!r}", 2)
    if mode == "embedded" and not os.environ.get("AWS_ENDPOINT_URL") and not recorded_server():
        raise _fail("no running AWS endpoint to act on: start one with `clusterflow local up`, "
                    "set AWS_ENDPOINT_URL, or use --aws real", 2)
    try:
        with aws_target(mode, cfg.region) as aws:  # type: ignore[arg-type]
            yield Guard(aws, cfg)
    except AwsConfigError as e:
        raise _fail(str(e), 2) from None
    except REFUSED as e:
        raise _fail(str(e), 2) from None
    except (ClientError, BotoCoreError) as e:
        raise _fail(f"AWS call failed: {e}", 1) from None


def _emit(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")


@guard_app.command()
def init(config: ConfigOpt = None, aws: AwsOpt = "embedded") -> None:
    """Create the registry table, the WAF IP sets and the block rule in every web ACL."""
    with _guard(config, aws) as g:
        for note in g.init():
            out.print(note)


@guard_app.command()
def block(
    cidr: Annotated[str, typer.Argument(help="IPv4 or IPv6 address or CIDR.")],
    ttl: Annotated[str | None, typer.Option(help="How long: 90s, 30m, 24h, 7d or 'never' "
                                                 "(default: the config's default_ttl).")] = None,
    reason: Annotated[str, typer.Option(help="Why (recorded and published).")] = "manual block",
    config: ConfigOpt = None, aws: AwsOpt = "embedded", as_json: JsonOpt = False,
) -> None:
    """Deny CIDR on the cluster subnets' NACLs and in the web ACLs' IP sets."""
    with _guard(config, aws) as g:
        ttl_s = parse_ttl(ttl if ttl is not None else g.cfg.default_ttl)
        g.init()
        r = g.block(cidr, ttl_s, reason)
        if as_json:
            _emit(r.as_dict())
            return
        rec = r.record
        if r.already:
            until = rec.as_dict()["expires"] or "unblocked"
            out.print(f"{rec.cidr} is already blocked (by {rec.by}); "
                      + (f"expiry extended to {until}" if r.extended
                         else f"until {until}: nothing changed"))
            return
        out.print(f"blocked {rec.cidr} until {rec.as_dict()['expires'] or 'unblocked'}")
        for layer in r.layers:
            out.print(f"  {layer['layer']}: {layer['where']}\n    why: {layer['why']}")
        if r.alert_error:
            err.print(f"[yellow]warning:[/] {r.alert_error}")


@guard_app.command()
def unblock(
    cidr: Annotated[str, typer.Argument(help="A CIDR the guard blocked.")],
    config: ConfigOpt = None, aws: AwsOpt = "embedded", as_json: JsonOpt = False,
) -> None:
    """Remove exactly the entries `guard block` added for CIDR."""
    with _guard(config, aws) as g:
        r = g.unblock(cidr)
        if as_json:
            _emit(r.as_dict())
            return
        out.print(f"unblocked {r.record.cidr}")
        for note in r.notes:
            out.print(f"  {note}")


@guard_app.command("list")
def list_blocks(config: ConfigOpt = None, aws: AwsOpt = "embedded",
                as_json: JsonOpt = False) -> None:
    """Blocked CIDRs: where, why, by whom, until when."""
    with _guard(config, aws) as g:
        rows = [r.as_dict() for r in g.blocks()]
        if as_json:
            _emit({"blocks": rows})
            return
        table = Table("cidr", "where", "reason", "by", "expires", box=None)
        for r in rows:
            where = ", ".join(
                f"{p['acl']} {'out' if p['egress'] else 'in'} #{p['rule']}" if p["layer"] == "nacl"
                else f"waf {p['scope']} {p['ip_set']}" for p in r["placements"])
            table.add_row(r["cidr"], where or r["state"], r["reason"], r["by"],
                          r["expires"] or "never")
        out.print(table if rows else "no blocks")


@guard_app.command()
def sweep(config: ConfigOpt = None, aws: AwsOpt = "embedded", as_json: JsonOpt = False) -> None:
    """Unblock every block whose TTL has run out (what the scheduled sweep runs)."""
    with _guard(config, aws) as g:
        done = [r.as_dict() for r in g.sweep()]
        if as_json:
            _emit({"unblocked": done})
            return
        out.print(f"{len(done)} expired block(s) removed"
                  + "".join(f"\n  {d['cidr']}" for d in done))


@guard_app.command()
def audit(config: ConfigOpt = None, aws: AwsOpt = "embedded", as_json: JsonOpt = False) -> None:
    """Ingress rules open to the world on SSH/Slurm/DB ports. Exit 1 when there are any."""
    with _guard(config, aws) as g:
        found = [f.as_dict() for f in g.audit()]
    if as_json:
        _emit({"open": found})
    else:
        for f in found:
            ports = "all" if f["protocol"] == "-1" else f"{f['from_port']}-{f['to_port']}"
            out.print(f"{f['group']} ({f['group_name']}): {f['protocol']} {ports} from "
                      f"{f['cidr']} reaches {', '.join(map(str, f['ports']))}")
        out.print(f"{len(found)} world-open rule(s) on sensitive ports")
    if found:
        raise typer.Exit(1)


@guard_app.command()
def lockdown(
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", help="CIDR that keeps access (repeat).")] = None,
    undo: Annotated[bool, typer.Option("--undo", help="Undo a lockdown (the last one, or "
                                                     "--id).")] = False,
    lockdown_id: Annotated[str | None, typer.Option("--id", help="Which lockdown to undo.")
                           ] = None,
    config: ConfigOpt = None, aws: AwsOpt = "embedded", as_json: JsonOpt = False,
) -> None:
    """Narrow world-open sensitive ingress to --allow CIDRs; --undo puts it back exactly."""
    with _guard(config, aws) as g:
        if undo:
            g.registry.ensure()
            lid, notes = g.undo_lockdown(lockdown_id)
            if as_json:
                _emit({"undone": lid, "notes": notes})
            else:
                out.print(f"undid lockdown {lid}" + "".join(f"\n  {n}" for n in notes))
            return
        g.registry.ensure()
        lid, record = g.lockdown(allow or [])
        if as_json:
            _emit({"lockdown": lid, **record})
            return
        out.print(f"lockdown {lid}: {len(record['changes'])} rule(s) narrowed to "
                  f"{', '.join(record['allow'])} (undo: clusterflow guard lockdown --undo "
                  f"--id {lid})")
        for c in record["changes"]:
            r = c["rule"]
            out.print(f"  {c['group']}: {r['protocol']} {r['from_port']}-{r['to_port']} from "
                      f"{r['cidr']} revoked, {len(c['added'])} rule(s) added")


if __name__ == "__main__":
    guard_app()
