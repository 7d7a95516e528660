"""The stager as a Prefect task, cached by the input manifest.

``stage_tree(src, dst, aws)`` is cached under a key made of the source listing's digest
(relative keys, sizes, ETags or local mtimes) and the destination. An unchanged input staged to
the same place again is answered from Prefect's cache without running; any change to the input
changes the key. The key is only offered when the destination provably still holds that input
(the stager's manifest cache and a stat/list of the destination agree): a deleted or edited
destination yields no key, so the task runs and repairs it instead of returning a stale result.

:func:`input_manifest_digest` gives the same digest for use in other cache keys (e.g. reuse of
an MPI result for unchanged input, kernel and parameters).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.context import TaskRunContext

from infra.aws.clients import AwsTarget
from infra.staging.model import StageOptions
from infra.staging.stager import Stager


def _cache_dir(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    from infra.aws.embedded import state_dir

    return state_dir() / "stage-cache"


def input_manifest_digest(aws: AwsTarget, src: str) -> str:
    """Digest of what ``src`` holds now (one listing, no data read)."""
    return Stager(aws).digest(_parse(src))


def _parse(text: str) -> Any:
    from infra.staging.locations import parse_location

    return parse_location(text)


def manifest_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Prefect ``cache_key_fn``: the input manifest + destination, or None if dst is not intact."""
    aws: AwsTarget = parameters["aws"]
    src, dst = _parse(parameters["src"]), _parse(parameters["dst"])
    stager = Stager(aws, cache_dir=_cache_dir(parameters.get("cache_dir")))
    digest, intact = stager.current_digest(src, dst)
    if not intact:
        return None
    ident = json.dumps([aws.endpoint_url or aws.region, src.uri, dst.uri, digest])
    return "stage-" + hashlib.sha256(ident.encode()).hexdigest()


@task(name="stage", cache_key_fn=manifest_cache_key, persist_result=True,
      retries=2, retry_delay_seconds=[2, 10])
def stage_tree(src: str, dst: str, aws: AwsTarget, cache_dir: str | None = None,
               concurrency: int = 16, sha256: bool = True) -> dict[str, Any]:
    """Stage ``src`` to ``dst`` (either side ``s3://bucket/prefix`` or a local directory).

    Returns the run's summary plus ``files``: relative path -> ``{"bytes", "sha256"}``
    (``sha256`` present when requested or when it was the check used).
    """
    logger = get_run_logger()
    stager = Stager(aws, StageOptions(concurrency=concurrency, sha256=sha256),
                    cache_dir=_cache_dir(cache_dir))
    report = stager.stage(src, dst)
    logger.info("staged %s -> %s: %d copied (%d bytes), %d unchanged, %.2f s",
                report.src, report.dst, report.copied, report.bytes_copied, report.unchanged,
                report.seconds)
    if report.skipped_entries:
        logger.warning("%d source entries were not staged (not regular files), e.g. %s",
                       len(report.skipped_entries), report.skipped_entries[:5])
    if report.unverified:
        logger.warning("%d file(s) had no checksum to verify against (size only), e.g. %s",
                       len(report.unverified), report.unverified[:5])
    files = {rel: {"bytes": rec["size"], **({"sha256": rec["sha256"]} if "sha256" in rec
                                             else {})}
             for rel, rec in sorted(report.records.items())}
    return {**report.summary(), "files": files}
