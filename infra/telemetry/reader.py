"""Read a run's telemetry back from S3 and say where the time went.

Firehose writes gzip'd newline-delimited JSON under ``telemetry/run_id=<id>/``. The summary
answers the questions an HPC user asks of a slow run: is the work balanced (load imbalance
= the slowest rank's step time / the mean rank's), which rank is slow, and at which step.
"""

from __future__ import annotations

import gzip
import json
import statistics
from collections import defaultdict
from typing import Any

from pydantic import BaseModel

from infra.aws.clients import AwsTarget


class RankSummary(BaseModel):
    rank: int
    host: str | None
    steps: int
    last_step: int | None
    seconds: float  # sum of reported seconds per step x steps covered
    mean_step_seconds: float
    wait_seconds: float
    bytes: int
    rss_bytes: int | None


class RunTelemetry(BaseModel):
    run_id: str
    registered: bool  # False: no run clusterflow started has this id (records kept, flagged)
    records: int
    objects: int
    ranks: list[RankSummary]
    load_imbalance: float | None
    slowest_rank: int | None
    slowest_step: dict[str, Any] | None  # {"rank", "step", "seconds"}
    other: int  # records that are not per-step reports (a user's own fields)


def load_records(aws: AwsTarget, bucket: str, run_id: str, prefix: str = "telemetry/",
                 ) -> tuple[list[dict[str, Any]], int]:
    """All records of ``run_id`` and the number of S3 objects they came from."""
    s3 = aws.client("s3")
    records: list[dict[str, Any]] = []
    objects = 0
    for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}run_id={run_id}/"):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            if obj["Key"].endswith(".gz"):
                body = gzip.decompress(body)
            objects += 1
            for line in body.splitlines():
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        continue  # a torn line never hides the rest of the run
    return records, objects


def is_registered(aws: AwsTarget, bucket: str, run_id: str, prefix: str = "telemetry/") -> bool:
    s3 = aws.client("s3")
    try:
        s3.head_object(Bucket=bucket, Key=f"{prefix}_runs/{run_id}.json")
        return True
    except s3.exceptions.ClientError:
        return False


def _rank_summary(rank: int, recs: list[dict[str, Any]]) -> RankSummary:
    recs = sorted(recs, key=lambda r: r.get("step", 0))
    # A record may stand for several steps (CLUSTERFLOW_TELEMETRY_EVERY): its "steps" field.
    covered = [max(1, int(r.get("steps", 1))) for r in recs]
    seconds = sum(float(r.get("seconds", 0)) * n for r, n in zip(recs, covered, strict=True))
    wait = sum(float(r.get("wait_seconds", 0)) * n for r, n in zip(recs, covered, strict=True))
    steps = sum(covered)
    rss = [int(r["rss_bytes"]) for r in recs if "rss_bytes" in r]
    return RankSummary(
        rank=rank, host=recs[-1].get("host") if recs else None, steps=steps,
        last_step=int(recs[-1]["step"]) if recs else None, seconds=seconds,
        mean_step_seconds=seconds / steps if steps else 0.0, wait_seconds=wait,
        bytes=sum(int(r.get("bytes", 0)) for r in recs), rss_bytes=max(rss) if rss else None)


def summarize(run_id: str, records: list[dict[str, Any]], *, registered: bool = True,
              objects: int = 0) -> RunTelemetry:
    """Per-rank totals, load imbalance (slowest rank / mean) and the slowest (rank, step)."""
    per_rank: dict[int, list[dict[str, Any]]] = defaultdict(list)
    other = 0
    for r in records:
        if r.get("kind") == "step" and isinstance(r.get("rank"), int) and "step" in r:
            per_rank[r["rank"]].append(r)
        else:
            other += 1
    ranks = [_rank_summary(k, v) for k, v in sorted(per_rank.items())]
    imbalance = slowest_rank = slowest = None
    if ranks:
        mean = statistics.fmean(r.seconds for r in ranks)
        top = max(ranks, key=lambda r: r.seconds)
        slowest_rank = top.rank
        imbalance = top.seconds / mean if mean > 0 else None
        worst = max((r for v in per_rank.values() for r in v),
                    key=lambda r: float(r.get("seconds", 0)))
        slowest = {"rank": worst["rank"], "step": worst["step"],
                   "seconds": float(worst.get("seconds", 0))}
    return RunTelemetry(run_id=run_id, registered=registered, records=len(records),
                        objects=objects, ranks=ranks, load_imbalance=imbalance,
                        slowest_rank=slowest_rank, slowest_step=slowest, other=other)


def timelines(records: list[dict[str, Any]]) -> dict[int, list[tuple[int, float, float]]]:
    """rank -> [(step, seconds per step, wait seconds per step)] in step order."""
    out: dict[int, list[tuple[int, float, float]]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "step" and isinstance(r.get("rank"), int):
            out[r["rank"]].append((int(r["step"]), float(r.get("seconds", 0)),
                                   float(r.get("wait_seconds", 0))))
    return {k: sorted(v) for k, v in sorted(out.items())}


def read_run(aws: AwsTarget, bucket: str, run_id: str, prefix: str = "telemetry/",
             ) -> tuple[RunTelemetry, list[dict[str, Any]]]:
    records, objects = load_records(aws, bucket, run_id, prefix)
    return summarize(run_id, records, registered=is_registered(aws, bucket, run_id, prefix),
                     objects=objects), records


def plot(summary: RunTelemetry, records: list[dict[str, Any]], path: str) -> None:
    """Per-rank timelines (seconds per step, halo wait dashed) and per-rank totals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    for rank, points in timelines(records).items():
        steps = [p[0] for p in points]
        (line,) = ax.plot(steps, [p[1] for p in points], label=f"rank {rank}")
        ax.plot(steps, [p[2] for p in points], linestyle="--", color=line.get_color(),
                alpha=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds per step (dashed: waiting on halos)")
    ax.legend(fontsize="small")
    bx.bar([str(r.rank) for r in summary.ranks], [r.seconds for r in summary.ranks])
    bx.set_xlabel("rank")
    bx.set_ylabel("seconds")
    imb = f"{summary.load_imbalance:.3f}" if summary.load_imbalance else "n/a"
    fig.suptitle(f"run {summary.run_id}: load imbalance {imb}, slowest rank "
                 f"{summary.slowest_rank}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
