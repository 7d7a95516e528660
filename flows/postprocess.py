"""Follow-up flow for a published run: summary statistics and a picture of the field.

Started by ``postprocess/on-result`` when a run's ``manifest.json`` lands in the results
bucket. It trusts nothing it did not verify: the field is downloaded against the SHA-256
S3 stored for it and must also match the manifest's, so a summary always describes exactly
the bytes the run published. Outputs go next to the manifest in S3 (``summary.json``,
``field.png``) and into the scratch dir (``<scratch>/<run-id>/postprocess/``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.spec import DEFAULT_SPEC, load_spec
from infra.aws.clients import AwsTarget
from infra.aws.embedded import aws_target
from infra.staging.objects import IntegrityError, download, upload

FIELD = "field.npy"
SUMMARY = "summary.json"
PICTURE = "field.png"
TELEMETRY_PICTURE = "telemetry.png"
# A PNG wider than this shows nothing more on a screen; bigger fields are strided down.
MAX_PIXELS = 1024


class NotAResult(ValueError):
    """The object the flow was started for is not a clusterflow result manifest."""


@task(name="read_result", cache_policy=NO_CACHE)
def read_result(aws: AwsTarget, bucket: str, key: str, work_dir: Path,
                ) -> tuple[dict[str, Any], Path | None]:
    """The manifest and the verified local copy of the field it describes (None when the
    run's kernel writes no field, e.g. var or kmer)."""
    raw = aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        manifest = json.loads(raw)
        files = {f["name"]: f for f in manifest["files"]}
        entry = files.get(FIELD)
    except (ValueError, KeyError, TypeError):
        raise NotAResult(f"s3://{bucket}/{key} is not a result manifest") from None
    if entry is None:
        return manifest, None
    prefix = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    staged = download(aws, bucket, prefix + FIELD, work_dir / FIELD)
    if staged.sha256 != entry["sha256"]:
        staged.path.unlink()
        raise IntegrityError(
            f"{staged.uri}: sha256 {staged.sha256} does not match the manifest's "
            f"{entry['sha256']}")
    get_run_logger().info("read %s (%d bytes, sha256 %s)", staged.uri, staged.bytes,
                          staged.sha256[:12])
    return manifest, staged.path


def field_statistics(field: np.ndarray) -> dict[str, Any]:
    peak = np.unravel_index(int(np.argmax(field)), field.shape)
    return {
        "shape": list(field.shape),
        "dtype": str(field.dtype),
        "min": float(field.min()),
        "max": float(field.max()),
        "mean": float(field.mean()),
        "std": float(field.std()),
        "total": float(field.sum(dtype=np.float64)),
        "l2_norm": float(np.sqrt(np.sum(np.square(field, dtype=np.float64)))),
        "argmax": [int(i) for i in peak],
        "finite": bool(np.isfinite(field).all()),
    }


@task(name="summarize", cache_policy=NO_CACHE)
def summarize(manifest: dict[str, Any], field_path: Path, source: str) -> dict[str, Any]:
    field = np.load(field_path, mmap_mode="r", allow_pickle=False)
    entry = next(f for f in manifest["files"] if f["name"] == FIELD)
    return {
        "source": source,
        "field_sha256": entry["sha256"],
        "kernel": manifest.get("kernel"),
        "parameters": manifest.get("parameters"),
        "ranks": manifest.get("ranks"),
        "statistics": field_statistics(field),
    }


@task(name="render", cache_policy=NO_CACHE)
def render(field_path: Path, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters or workers
    import matplotlib.pyplot as plt

    field = np.load(field_path, mmap_mode="r", allow_pickle=False)
    if field.ndim == 3:  # a 3D run: its middle z plane
        field = field[field.shape[0] // 2]
    step = max(1, -(-max(field.shape) // MAX_PIXELS))
    shown = np.asarray(field[::step, ::step])
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    try:
        image = ax.imshow(shown, cmap="inferno", origin="lower", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="u")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"x (every {step})" if step > 1 else "x")
        ax.set_ylabel(f"y (every {step})" if step > 1 else "y")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out


def _summarize_other(aws: AwsTarget, manifest: dict[str, Any], bucket: str, key: str,
                     prefix: str, run_id: str, work_dir: Path) -> dict[str, Any]:
    """A run without a field (var, kmer): its manifest's facts, no picture."""
    summary = {
        "source": f"s3://{bucket}/{key}",
        "run_id": run_id,
        "kernel": manifest.get("kernel"),
        "parameters": manifest.get("parameters"),
        "ranks": manifest.get("ranks"),
        "files": {f["name"]: f["sha256"] for f in manifest["files"]},
        "outputs": {"summary": f"s3://{bucket}/{prefix}{SUMMARY}",
                    "scratch_dir": str(work_dir)},
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / SUMMARY
    path.write_text(json.dumps(summary, indent=2) + "\n")
    upload(aws, path, bucket, prefix + SUMMARY)
    get_run_logger().info("run %s (%s): no field to picture; wrote %s", run_id,
                          summary["kernel"], summary["outputs"]["summary"])
    return summary


def attach_telemetry(aws: AwsTarget, manifest: dict[str, Any], bucket: str, prefix: str,
                     run_id: str, work_dir: Path) -> dict[str, Any] | None:
    """The run's telemetry picture (per-rank timelines, load imbalance) next to its manifest,
    as ``clusterflow telemetry show --png`` draws it; None when the run reported none yet
    (telemetry off, or Firehose still buffering)."""
    if not (manifest.get("telemetry") or {}).get("sent"):
        return None
    from infra.telemetry.reader import plot, read_run

    summary, records = read_run(aws, bucket, run_id)
    if not records:
        get_run_logger().info("run %s: telemetry not delivered yet; no timeline picture",
                              run_id)
        return None
    work_dir.mkdir(parents=True, exist_ok=True)
    plot(summary, records, str(work_dir / TELEMETRY_PICTURE))
    upload(aws, work_dir / TELEMETRY_PICTURE, bucket, prefix + TELEMETRY_PICTURE)
    return {"picture": f"s3://{bucket}/{prefix}{TELEMETRY_PICTURE}",
            "load_imbalance": summary.load_imbalance, "slowest_rank": summary.slowest_rank}


@flow(name="postprocess", log_prints=True)
def postprocess(key: str, bucket: str | None = None, spec_path: str | None = None,
                aws_mode: str | None = None) -> dict[str, Any]:
    """Summarise the run whose manifest is ``s3://<bucket>/<key>`` and picture its field.

    ``spec_path`` defaults to ``$CLUSTERFLOW_SPEC`` (the spec a ``clusterflow local up``
    stack runs), else the bundled spec. ``bucket`` defaults to the spec's results bucket; the
    spec also says which AWS to use (embedded or real), the region and the scratch dir.
    """
    logger = get_run_logger()
    spec = load_spec(spec_path or os.environ.get("CLUSTERFLOW_SPEC") or DEFAULT_SPEC,
                     aws=aws_mode)
    bucket = bucket or spec.storage.results_bucket
    prefix = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    run_id = prefix.rstrip("/").rsplit("/", 1)[-1] or "result"
    work_dir = (spec.scratch_dir / run_id / "postprocess").resolve()
    with aws_target(spec.aws, spec.region) as aws:
        manifest, field_path = read_result(aws, bucket, key, work_dir)
        if field_path is None:
            return _summarize_other(aws, manifest, bucket, key, prefix, run_id, work_dir)
        summary = summarize(manifest, field_path, f"s3://{bucket}/{key}")
        summary["run_id"] = run_id
        summary["telemetry"] = attach_telemetry(aws, manifest, bucket, prefix, run_id,
                                                work_dir)
        picture = render(field_path, f"{run_id}: {summary['kernel'] or 'field'} "
                         f"{'x'.join(map(str, summary['statistics']['shape']))}",
                         work_dir / PICTURE)
        summary["outputs"] = {
            "summary": f"s3://{bucket}/{prefix}{SUMMARY}",
            "picture": f"s3://{bucket}/{prefix}{PICTURE}",
            "scratch_dir": str(work_dir),
        }
        summary_path = work_dir / SUMMARY
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        upload(aws, picture, bucket, prefix + PICTURE)
        upload(aws, summary_path, bucket, prefix + SUMMARY)
    field_path.unlink()  # the verified copy was only needed for this flow
    stats = summary["statistics"]
    logger.info("run %s: min %.4g max %.4g mean %.4g; wrote %s and %s", run_id, stats["min"],
                stats["max"], stats["mean"], summary["outputs"]["summary"],
                summary["outputs"]["picture"])
    return summary
