"""``clusterflow validate FILE...``: check ParallelCluster and Batch configs before using them.

Mounted on the main CLI with ``register(app)``. Each file is recognised by its content: a
ParallelCluster 3 config has ``HeadNode`` / ``Scheduling`` / ``Image``; a clusterflow Batch
config says ``kind: batch-mnp``. Every error is printed as ``FILE: FIELD.PATH: message`` and
the exit code is 1; a valid file prints one summary line; warnings (what ParallelCluster
itself only warns about) are printed as ``FILE: FIELD.PATH: warning: message`` and never change
the exit code. Exit code 2: the files could not be checked at all (e.g. ``--check-aws``
without credentials). A file that cannot be read or checked (a directory, binary, not UTF-8,
a placeholder region) is one error line for that file; every other file is still reported.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from botocore.exceptions import BotoCoreError, ClientError
from rich.console import Console
from rich.markup import escape

from infra.aws.clients import AwsConfigError, AwsTarget
from infra.clusters.batch_config import is_batch_config, summary, validate_batch_config
from infra.clusters.config_issues import ConfigInvalid, ConfigIssue, load_yaml_mapping
from infra.clusters.parallelcluster_validate import (
    config_region,
    is_parallelcluster_config,
    region_issue,
    validate_cluster_config,
)


@dataclasses.dataclass(frozen=True)
class FileResult:
    file: str
    kind: str  # parallelcluster | batch | unknown
    summary: str
    errors: list[ConfigIssue]
    warnings: list[ConfigIssue] = dataclasses.field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "valid": self.valid,
                "summary": self.summary,
                "errors": [{"path": e.path, "message": e.message} for e in self.errors],
                "warnings": [{"path": w.path, "message": w.message} for w in self.warnings]}


def _target(check_aws: bool, region: str) -> AwsTarget | None:
    if not check_aws:
        return None
    from infra.aws.clients import real_target

    return real_target(region)


def validate_file(path: Path, *, check_aws: bool = False, region: str | None = None,
                  subnet_azs: dict[str, str] | None = None) -> FileResult:
    """One file's verdict; never raises for a problem of that file (``AwsConfigError``, a
    problem of the whole run, propagates)."""
    try:
        return _validate_file(path, check_aws=check_aws, region=region, subnet_azs=subnet_azs)
    except AwsConfigError:
        raise
    except (BotoCoreError, ClientError) as e:  # --check-aws: the endpoint, not the file
        message = " ".join(str(e).split()) or type(e).__name__
        return FileResult(str(path), "unknown", "", [ConfigIssue(
            "<aws>", f"the account look-ups failed ({message}): check the endpoint, region and "
            "credentials, or validate without --check-aws")])
    except Exception as e:  # noqa: BLE001 - one file's failure must not hide the others'
        message = " ".join(str(e).split()) or "no message"
        return FileResult(str(path), "unknown", "", [ConfigIssue(
            "<file>", f"could not be checked ({type(e).__name__}: {message}); this is a "
            "clusterflow bug, please report it with the file")])


def _validate_file(path: Path, *, check_aws: bool, region: str | None,
                   subnet_azs: dict[str, str] | None) -> FileResult:
    try:
        raw = load_yaml_mapping(path)
    except ConfigInvalid as e:
        return FileResult(str(path), "unknown", "", e.issues)
    try:
        if is_batch_config(raw):
            raw = {**raw, "subnet_azs": {**(subnet_azs or {}), **raw.get("subnet_azs", {})}}
            cfg = validate_batch_config(
                raw, source=str(path),
                aws=_target(check_aws, str(raw.get("region") or region or "us-east-1")))
            return FileResult(str(path), "batch", summary(cfg), [])
        if is_parallelcluster_config(raw):
            bad_region = region_issue(raw, region)  # before --check-aws builds a client with it
            if bad_region:
                raise ConfigInvalid(str(path), [bad_region])
            cluster = validate_cluster_config(
                raw, source=str(path), region=region, subnet_azs=subnet_azs,
                aws=_target(check_aws, config_region(raw, region)))
            return FileResult(str(path), "parallelcluster", cluster.summary(), [],
                              list(cluster.warnings))
    except ConfigInvalid as e:
        kind = "batch" if is_batch_config(raw) else "parallelcluster"
        return FileResult(str(path), kind, "", e.issues, e.warnings)
    hint = (" (files under a batch/ folder are clusterflow Batch configs: add 'kind: batch-mnp')"
            if path.parent.name == "batch" else "")
    return FileResult(str(path), "unknown", "", [ConfigIssue(
        "<root>", "not a ParallelCluster 3 config (no HeadNode/Scheduling/Image) nor a "
        f"clusterflow Batch config (kind: batch-mnp){hint}")])


def _parse_subnet_azs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        subnet, sep, az = pair.partition("=")
        if not sep or not subnet.startswith("subnet-") or not az:
            raise typer.BadParameter(f"{pair!r}: expected SUBNET_ID=AVAILABILITY_ZONE, e.g. "
                                     "subnet-0abc=us-east-2b", param_hint="--subnet-az")
        out[subnet] = az
    return out


def validate(
    files: Annotated[list[Path], typer.Argument(help="ParallelCluster or Batch config files.")],
    check_aws: Annotated[bool, typer.Option(
        "--check-aws", help="Also check subnets, AZs, security groups, key pairs and instance "
        "offerings against your AWS account (standard credentials, or AWS_ENDPOINT_URL).")] = False,
    region: Annotated[str | None, typer.Option(
        help="Region for configs that do not name one (default AWS_DEFAULT_REGION or "
        "us-east-1).")] = None,
    subnet_az: Annotated[list[str] | None, typer.Option(
        "--subnet-az", help="SUBNET=AZ, repeatable: Availability Zones of subnets, for the "
        "one-AZ checks offline.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array.")] = False,
) -> None:
    """Validate cluster configs offline: ParallelCluster's own schema plus clusterflow's checks
    (EFA support, placement groups, one AZ for EFA / placement groups, MaxCount >= MinCount;
    warnings where ParallelCluster warns, and for GPU health checks on types without GPUs)."""
    azs = _parse_subnet_azs(subnet_az or [])
    try:
        results = [validate_file(f, check_aws=check_aws, region=region, subnet_azs=azs)
                   for f in files]
    except AwsConfigError as e:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps([r.as_json() for r in results]) + "\n")
    else:
        out = Console(soft_wrap=True, highlight=False)
        for r in results:
            if r.valid:
                out.print(f"[green]{escape(r.file)}: ok[/] - {escape(r.summary)}")
            for e in r.errors:
                out.print(f"[red]{escape(r.file)}[/]: {escape(e.path)}: {escape(e.message)}")
            for w in r.warnings:
                out.print(f"[yellow]{escape(r.file)}[/]: {escape(w.path)}: warning: "
                          f"{escape(w.message)}")
        bad = [r for r in results if not r.valid]
        if bad:
            count = sum(len(r.errors) for r in bad)
            out.print(f"{count} error(s) in {len(bad)} of {len(results)} file(s)")
    if any(not r.valid for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``validate`` to the ``clusterflow`` command line."""
    app.command(name="validate")(validate)
