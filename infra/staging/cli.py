"""``clusterflow stage SRC DST``: the stager on the command line.

Mounted on the main app with ``register(app)``. It does not import Prefect, so a re-stage of an
unchanged tree costs one listing plus local stats, not an interpreter full of Prefect.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Annotated, Any

import typer
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress

from infra.aws.clients import AwsConfigError
from infra.staging.locations import (
    OutsideLinkError,
    StageError,
    UnsafeKeyError,
    human_bytes,
    parse_location,
)
from infra.staging.model import Progress, StageOptions
from infra.staging.stager import Stager

err = Console(stderr=True, soft_wrap=True)  # an error is one line, however long
PROGRESS_AFTER_S = 2.0


class _LazyBar:
    """A rich progress bar that appears only once a transfer has run for a couple of seconds."""

    def __init__(self, console: Console, label: str) -> None:
        self.console, self.label = console, label
        self.t0 = time.monotonic()
        self.bar: RichProgress | None = None
        self.task: Any = None

    def __call__(self, p: Progress) -> None:
        if self.bar is None:
            if time.monotonic() - self.t0 < PROGRESS_AFTER_S or not self.console.is_terminal:
                return
            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=max(p.bytes_total, 1))
        with p.lock:
            done, total = p.bytes_done, p.bytes_total
            files, files_total = p.files_done, p.files_total
        self.bar.update(self.task, completed=done, total=max(total, 1),
                        description=f"{self.label} {files}/{files_total} files")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _error(message: str) -> None:
    # Escaped: user text (paths, keys, patterns with [...]) is never read as rich markup.
    err.print(f"[red]error:[/] {escape(message)}", highlight=False)


def stage(
    src: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local directory.")],
    dst: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local directory.")],
    aws: Annotated[str, typer.Option(
        help="'embedded' (AWS_ENDPOINT_URL, or a local moto server) or 'real' (your account)."
    )] = "embedded",
    region: Annotated[str, typer.Option(help="AWS region.")] = "us-east-1",
    concurrency: Annotated[int, typer.Option(help="Files in flight at once.")] = 16,
    allow_empty: Annotated[bool, typer.Option(help="An empty source is not an error.")] = False,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Ignore the manifest cache: prove unchanged files by checksum.")
    ] = False,
    sha256: Annotated[bool, typer.Option(help="Record every file's SHA-256.")] = False,
    follow_links: Annotated[bool, typer.Option(
        "--follow-links", help="Upload what symlinks leaving the source tree point to, and "
        "descend into linked directories (by default the first is refused, the second skipped).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON summary.")] = False,
) -> None:
    """Copy a prefix/tree between S3 and a local directory: verified, resumable, incremental.

    Unchanged files are skipped; a re-run after an interruption moves only the rest.
    """
    from infra.aws.reachability import check_endpoint, check_region, one_line

    if aws not in ("embedded", "real"):
        _error(f"--aws must be 'embedded' or 'real', not {aws!r}")
        raise typer.Exit(2)
    try:
        s, d = parse_location(src), parse_location(dst)
        options = StageOptions(concurrency=concurrency, allow_empty=allow_empty, sha256=sha256,
                               follow_links=follow_links)
        check_region(region, field="--region")
        if os.environ.get("AWS_ENDPOINT_URL"):
            check_endpoint(os.environ["AWS_ENDPOINT_URL"])
    except (StageError, ValueError, AwsConfigError) as e:
        _error(str(e))
        raise typer.Exit(2) from None

    from infra.aws.embedded import aws_target, recorded_server, state_dir

    started_here = (aws == "embedded" and not os.environ.get("AWS_ENDPOINT_URL")
                    and recorded_server() is None)
    # SIGTERM (a scheduler's kill, `timeout`) unwinds like Ctrl-C, so partial files are removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    bar = _LazyBar(err, "staging")
    try:
        with aws_target(aws, region) as target:  # type: ignore[arg-type]
            stager = Stager(target, options,
                            cache_dir=None if no_cache else state_dir() / "stage-cache",
                            watcher=bar, journal_dir=state_dir() / "stage-cache" / "uploads")
            report = stager.stage(s, d)
    except AwsConfigError as e:
        bar.stop()
        _error(str(e))
        raise typer.Exit(1) from None
    except (UnsafeKeyError, OutsideLinkError) as e:
        bar.stop()
        err.print(f"[red]refused:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    except ParamValidationError as e:  # e.g. a bucket name S3 cannot have: nothing was moved
        bar.stop()
        _error(one_line(e))
        raise typer.Exit(2) from None
    except (BotoCoreError, ClientError) as e:  # the endpoint went away, access denied, ...
        bar.stop()
        _error(one_line(e))
        raise typer.Exit(1) from None
    except StageError as e:
        bar.stop()
        hint = ""
        if started_here and "s3://" in src:
            hint = ("\nhint: the embedded AWS endpoint was started for this command only and is "
                    "empty; set AWS_ENDPOINT_URL to the endpoint that holds the data")
        _error(f"{e}{hint}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        bar.stop()
        err.print("[yellow]interrupted:[/] partial files were removed; re-run to resume")
        raise typer.Exit(130) from None
    bar.stop()
    summary = report.summary()
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    out = Console(soft_wrap=True)
    out.print(f"[bold green]staged[/] {escape(s.uri)} -> {escape(d.uri)} in "
              f"{report.seconds:.2f} s",
              highlight=False)
    out.print(f"copied   {report.copied} files, {human_bytes(report.bytes_copied)}")
    out.print(f"skipped  {report.unchanged} unchanged files, {human_bytes(report.bytes_skipped)}"
              + (f" ({report.verified_in_place} proved by checksum)"
                 if report.verified_in_place else ""))
    if report.checks:
        out.print("verified " + ", ".join(f"{n} by {c}" for c, n in sorted(report.checks.items())),
                  highlight=False)
    if report.skipped_entries:
        out.print(f"[yellow]skipped  {len(report.skipped_entries)} entries that are not "
                  "regular files:[/]", highlight=False)
        for x in report.skipped_entries[:20]:
            out.print(f"  {x['path']}: {x['reason']}", highlight=False, markup=False)
        if len(report.skipped_entries) > 20:
            out.print(f"  ... and {len(report.skipped_entries) - 20} more (--json lists all)")
    if report.reclaimed_parts or report.reclaimed_uploads:
        out.print(f"reclaimed {report.reclaimed_parts} partial file(s) and "
                  f"{report.reclaimed_uploads} incomplete multipart upload(s) left by killed runs")
    if report.incomplete_uploads:
        out.print(f"{len(report.incomplete_uploads)} incomplete multipart upload(s) under "
                  f"{d.uri} were not started by this stager or belong to a running one "
                  f"(e.g. {report.incomplete_uploads[0]!r}); a lifecycle rule "
                  "AbortIncompleteMultipartUpload reclaims them", style="yellow",
                  highlight=False, markup=False)
    if report.unverified:
        out.print(f"[yellow]{len(report.unverified)} file(s) had no checksum to verify "
                  "against (size checked only)[/]")


def register(app: typer.Typer) -> None:
    """Add ``stage`` to the ``clusterflow`` app."""
    app.command("stage")(stage)


def main() -> None:  # pragma: no cover - ``python -m infra.staging.cli``
    app = typer.Typer(add_completion=False)
    register(app)

    @app.callback()
    def _root() -> None:
        """clusterflow staging."""

    app()


if __name__ == "__main__":  # pragma: no cover
    main()

