"""``clusterflow events``: apply, inspect, drain, replay and repair the event fabric.

Mounted by ``flows.cli`` as ``app.add_typer(events_app, name="events")``; also runnable as
``python -m event_bridge.cli``. Every command acts on ``AWS_ENDPOINT_URL`` when it is set, on
the long-lived embedded endpoint ``clusterflow local up`` recorded otherwise, and on your AWS
account with ``--aws real``. It refuses to start a one-shot embedded endpoint: that would be
empty and gone when the command ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from event_bridge.fabric import DEFAULT_FABRIC, Fabric, FabricError, load_fabric
from infra.aws.clients import AwsConfigError, AwsTarget

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="The event fabric: S3 -> EventBridge -> SNS -> SQS and its consumers.")
dlq_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="Inspect a queue's dead-letter queue and move messages back.")
app.add_typer(dlq_app, name="dlq")

# Piped output keeps whole names instead of folding tables to 80 columns.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 200, soft_wrap=True)

FabricOpt = Annotated[Path, typer.Option("--fabric", help="Fabric YAML.")]
AwsOpt = Annotated[str, typer.Option(
    "--aws", help="'embedded' (AWS_ENDPOINT_URL or `clusterflow local up`'s endpoint) or "
                  "'real' (your AWS account).")]
RegionOpt = Annotated[str | None, typer.Option(help="AWS region (default: the fabric's, "
                                                    "AWS_REGION, or us-east-1).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    # Escaped: a message quoting a pattern like ^[a-z0-9]+$ must keep its brackets.
    err.print(f"[red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _fabric(path: Path) -> Fabric:
    try:
        return load_fabric(path)
    except FabricError as e:
        raise _fail(str(e), 2) from None


def _region(fabric: Fabric | None, region: str | None) -> str:
    from infra.aws.reachability import check_region

    sources = [("--region", region), ("the fabric's region", fabric.region if fabric else None),
               ("AWS_REGION", os.environ.get("AWS_REGION")),
               ("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION"))]
    name, value = next(((n, v) for n, v in sources if v), ("default", "us-east-1"))
    try:
        check_region(value, field=name)  # named by where it came from, before any call
    except AwsConfigError as e:
        raise _fail(str(e), 2) from None
    return value


@contextlib.contextmanager
def _target(mode: str, region: str) -> Iterator[AwsTarget]:
    from infra.aws.embedded import aws_target, recorded_server
    from infra.aws.reachability import check_endpoint, one_line

    if mode not in ("embedded", "real"):
        raise _fail(f"--aws must be 'embedded' or 'real', not {mode!r}", 2)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        try:
            check_endpoint(endpoint)
        except AwsConfigError as e:
            raise _fail(str(e), 2) from None
    if mode == "embedded" and not endpoint and not recorded_server():
        raise _fail("no running AWS endpoint to act on: start one with `clusterflow local up`, "
                    "set AWS_ENDPOINT_URL, or use --aws real", 2)
    try:
        with aws_target(mode, region) as aws:  # type: ignore[arg-type]
            yield aws
    except AwsConfigError as e:
        raise _fail(str(e), 2) from None
    except (BotoCoreError, ClientError) as e:  # e.g. the endpoint went away, access denied
        raise _fail(one_line(e)) from None


def _logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(message)s", force=True,
                        handlers=[RichHandler(console=err, show_path=False)])
    logging.getLogger("botocore").setLevel(logging.WARNING)


def _emit(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


@app.command("apply")
def apply_cmd(fabric: FabricOpt = DEFAULT_FABRIC, aws: AwsOpt = "embedded",
              region: RegionOpt = None, as_json: JsonOpt = False) -> None:
    """Create or update every resource the fabric declares (idempotent: never duplicates)."""
    from event_bridge.apply import apply_fabric
    from event_bridge.ensure_rules import PatternCheckFailed

    spec = _fabric(fabric)
    _logging(logging.WARNING)
    with _target(aws, _region(spec, region)) as target:
        try:
            applied = apply_fabric(target, spec)
        except PatternCheckFailed as e:
            raise _fail(str(e), 2) from None
    if as_json:
        _emit(applied.as_dict())
        return
    out.print(f"[bold green]fabric applied[/] on {escape(target.label)}: "
              f"{len(applied.queues)} queues, "
              f"{len(applied.topics)} topics, {len(applied.rules)} rules, "
              f"{len(applied.archives)} archives")
    for change in applied.changes or ["no change: everything already matched the fabric"]:
        out.print(f"  {change}", markup=False)


@app.command("show")
def show_cmd(fabric: FabricOpt = DEFAULT_FABRIC, aws: AwsOpt = "embedded",
             region: RegionOpt = None, as_json: JsonOpt = False) -> None:
    """What exists of the fabric: queues with depths and DLQs, subscriptions, rules, drift."""
    from event_bridge.show import drift_lines, show

    spec = _fabric(fabric)
    with _target(aws, _region(spec, region)) as target:
        report = show(target, spec)
    if as_json:
        _emit(report)
        return
    table = Table("queue", "visible", "in flight", "DLQ", "DLQ depth", "maxReceive",
                  "visibility", "drift", box=None)
    for name, q in report["queues"].items():
        if q.get("missing"):
            table.add_row(escape(name), "[red]missing[/]", "", "", "", "", "", "")
            continue
        table.add_row(escape(name), str(q["visible"]), str(q["in_flight"]),
                      escape(q.get("dlq", "-")), str(q.get("dlq_depth", "-")),
                      str(q.get("max_receive_count", "-")), f"{q['visibility_timeout']} s",
                      escape("; ".join(q["drift"])))
    out.print(table)
    for name, t in report["topics"].items():
        if t.get("missing"):
            out.print(f"topic {escape(name)}: [red]missing[/]")
            continue
        out.print(f"topic {name}", markup=False)
        for s in t["subscriptions"]:
            policy = f" filter {json.dumps(s['filter_policy'])}" if "filter_policy" in s else ""
            out.print(f"  -> {s['protocol']} {s['endpoint'].rsplit(':', 1)[-1]}{policy}",
                      markup=False)
    for name, r in report["rules"].items():
        state = "[red]missing[/]" if r.get("missing") else escape(r["state"])
        targets = ", ".join(a.rsplit(":", 1)[-1] for a in r.get("targets", []))
        out.print(f"rule {escape(name)}: {state} -> {escape(targets)}")
    for name, a in report["archives"].items():
        out.print(f"archive {escape(name)}: " + (
            "[red]missing[/]" if a.get("missing")
            else escape(f"{a['state']}, {a['event_count']} events")))
    for c in report["consumers"]:
        out.print(f"consumer {c['name']}: {c['source']} -> {c['handler']}"
                  + ("" if c["background"] else " (drain only)"), markup=False)
    if report["in_sync"]:
        out.print("[green]in sync with the fabric[/]")
        return
    drift = drift_lines(report)
    out.print(f"[yellow]not in sync[/]: missing {escape(', '.join(report['missing']) or '-')}; "
              f"{len(drift)} drift(s)", highlight=False)
    for line in drift:
        out.print(f"  drift: {escape(line)}", highlight=False)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@app.command("drain")
def drain_cmd(
    fabric: FabricOpt = DEFAULT_FABRIC, aws: AwsOpt = "embedded", region: RegionOpt = None,
    queue: Annotated[list[str] | None, typer.Option(
        "--queue", help="Only this queue or consumer (repeatable).")] = None,
    backoff: Annotated[int, typer.Option(
        help="Seconds before a failed message's first retry; doubles per retry.")] = 1,
    backoff_max: Annotated[int, typer.Option(help="Longest retry backoff, seconds.")] = 30,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
) -> None:
    """Consume every fan-out queue until truly empty; poison messages end in the DLQs.

    Prints one JSON object: processed, failed, sent_to_dlq, seconds, and the same per queue.
    """
    from event_bridge.runtime import Backoff
    from event_bridge.service import drain

    spec = _fabric(fabric)
    _logging(logging.WARNING)
    logging.getLogger("event_bridge.runtime").setLevel(logging.INFO)  # what a wait waits for
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops a drain as cleanly as Ctrl-C
    with _target(aws, _region(spec, region)) as target:
        try:
            summary = drain(target, spec, only=queue or None,
                            backoff=Backoff(base_s=backoff, max_s=backoff_max), timeout_s=timeout)
        except LookupError as e:
            raise _fail(str(e), 2) from None
        except KeyboardInterrupt:
            raise _fail("drain stopped; the messages and claims it held were handed back",
                        130) from None
    _emit(summary)
    if not summary["ok"]:
        raise typer.Exit(1)


@app.command("consume")
def consume_cmd(
    fabric: FabricOpt = DEFAULT_FABRIC, aws: AwsOpt = "embedded", region: RegionOpt = None,
    consumer: Annotated[list[str] | None, typer.Option(
        "--consumer", help="Only this consumer or queue (repeatable).")] = None,
    wait: Annotated[int, typer.Option(
        help="Long-poll seconds per receive (also the longest a stop waits).")] = 5,
) -> None:
    """Run the fabric's background consumers until SIGTERM or Ctrl-C (for `local up`)."""
    from event_bridge.service import consume

    spec = _fabric(fabric)
    _logging(logging.INFO)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with _target(aws, _region(spec, region)) as target:
        try:
            stats = consume(target, spec, stop, only=consumer or None, wait_time_s=wait)
        except (LookupError, ImportError) as e:
            raise _fail(str(e), 2) from None
    _emit({"consumers": stats})


@app.command("replay")
def replay_cmd(
    since: Annotated[str, typer.Option(help="Start: ISO 8601, 'now', or -15m / -2h / -1d.")],
    until: Annotated[str, typer.Option(help="End (exclusive), same forms.")] = "now",
    archive: Annotated[str | None, typer.Option(help="Archive (default: the first).")] = None,
    fabric: FabricOpt = DEFAULT_FABRIC, aws: AwsOpt = "embedded", region: RegionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-deliver the archived events of a time window to the fabric's rules."""
    from event_bridge.replay import parse_time, replay

    spec = _fabric(fabric)
    try:
        start, end = parse_time(since), parse_time(until)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    with _target(aws, _region(spec, region)) as target:
        try:
            result = replay(target, spec, start, end, archive=archive)
        except (LookupError, ValueError) as e:
            raise _fail(str(e), 2) from None
    if as_json:
        _emit(result)
    else:
        out.print(f"replay {result['replay']} from archive {result['archive']}: "
                  f"{result['state']} ({result['since']} .. {result['until']}) to rules "
                  f"{', '.join(result['rules'])}", markup=False)


@dlq_app.command("ls")
def dlq_ls(
    queue: Annotated[str, typer.Argument(help="The source queue (not the DLQ itself).")],
    limit: Annotated[int, typer.Option(help="Peek at most this many messages.")] = 50,
    aws: AwsOpt = "embedded", region: RegionOpt = None, as_json: JsonOpt = False,
) -> None:
    """Depth of QUEUE's DLQ and a peek at its messages (left in place)."""
    from event_bridge.dlq import list_dlq

    with _target(aws, _region(None, region)) as target:
        try:
            listing = list_dlq(target, queue, limit=limit)
        except LookupError as e:
            raise _fail(str(e), 2) from None
    if as_json:
        _emit(listing)
        return
    depth = listing["depth"]
    out.print(f"{listing['dlq']}: {depth['visible']} message(s), {depth['in_flight']} in flight",
              markup=False)
    table = Table("message id", "receives", "bytes", "body", box=None)
    for m in listing["messages"]:  # bodies are anyone's text: escaped, never markup
        table.add_row(escape(m["message_id"]), str(m["receive_count"]), str(m["bytes"]),
                      escape(m["body"][:80].replace("\n", " ")))
    out.print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    queue: Annotated[str, typer.Argument(help="The source queue to move its DLQ back into.")],
    method: Annotated[str, typer.Option(
        help="auto (StartMessageMoveTask; copy only where the endpoint lacks it), move-task, "
             "or copy.")] = "auto",
    aws: AwsOpt = "embedded", region: RegionOpt = None, as_json: JsonOpt = False,
) -> None:
    """Move every message in QUEUE's DLQ back to QUEUE, without losing any."""
    from event_bridge.dlq import redrive

    with _target(aws, _region(None, region)) as target:
        try:
            result = redrive(target, queue, method=method)
        except (LookupError, ValueError) as e:  # also RedriveUnsupported: nothing was moved
            raise _fail(str(e), 2) from None
        except RuntimeError as e:  # the move task itself failed
            raise _fail(str(e)) from None
    if as_json:
        _emit(result.as_dict())
    else:
        out.print(f"moved {result.moved} message(s) from {result.dlq} back to {queue} "
                  f"({result.method}, {result.status})", markup=False)


if __name__ == "__main__":
    app()
