"""What a pipeline run leaves in the Prefect UI: artifacts people look at.

Every run publishes, under keys derived from the spec's name (so the UI's artifact page
shows one history per spec across runs):

- ``<spec>-summary``: markdown with the stages and their timings, the result and its
  sha256, the S3 locations and a link to the run's manifest;
- ``<spec>-points``: a table, one row per stage (one kernel) or per step point (steps and
  sweeps): state, seconds, outputs;
- heat: ``<spec>-field``, markdown with the field picture; var: ``<spec>-var``, a table of
  VaR/ES with their confidence; kmer: ``<spec>-kmer-top`` (a table) and
  ``<spec>-kmer-histogram`` (markdown with the plot).

Pictures are embedded in the markdown as ``data:`` URIs. A link into S3 would only load
while its endpoint runs, and the embedded moto endpoint of a single ``clusterflow run``
stops with the run; a data URI shows in the UI for as long as the artifact exists. Links to
the manifest are presigned URLs (signed locally; moto ignores the signature, real S3 checks
it), so a browser can open them while the endpoint is up.

Publishing is best effort: the run's result is in S3 and its summary is returned either
way, so an API that refuses an artifact costs a warning in the log, not the run.
"""

from __future__ import annotations

import base64
import contextvars
import csv
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from flows import phase_clock
from flows.spec import PipelineSpec
from infra.aws.clients import AwsTarget

MANIFEST = "manifest.json"
# A picture bigger than this is linked, not embedded: artifact rows live in Prefect's database.
MAX_EMBEDDED_BYTES = 2_000_000
TOP_KMERS = 20
PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4's maximum


def artifact_keys(spec_name: str, kernel: str | None) -> dict[str, str]:
    """The stable keys a spec's runs publish under (spec names are already key-safe)."""
    keys = {"summary": f"{spec_name}-summary", "points": f"{spec_name}-points",
            "manifest": f"{spec_name}-manifest"}
    if kernel == "heat":
        keys["field"] = f"{spec_name}-field"
    elif kernel == "var":
        keys["var"] = f"{spec_name}-var"
    elif kernel == "kmer":
        keys["kmer-top"] = f"{spec_name}-kmer-top"
        keys["kmer-histogram"] = f"{spec_name}-kmer-histogram"
    return keys


def _s3_split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def presigned(aws: AwsTarget, uri: str) -> str:
    """An https/http URL a browser can open for ``s3://bucket/key`` (no request is made)."""
    bucket, key = _s3_split(uri)
    return str(aws.client("s3").generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_SECONDS))


def data_uri_png(path: Path) -> str | None:
    data = path.read_bytes()
    if len(data) > MAX_EMBEDDED_BYTES:
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(summary: dict[str, Any], manifest_url: str) -> str:
    title = f"{summary['spec']}: {summary.get('kernel') or 'steps'} run `{summary['run_id']}`"
    state = summary.get("state", "succeeded")
    lines = [f"# {title}", "",
             f"**State:** {state} · **backend:** {summary['backend']} · "
             f"**ranks:** {summary['ranks']} · **AWS:** {_cell(summary['aws'])}", ""]
    if summary.get("computed_by") and summary["computed_by"] != summary["run_id"]:
        lines += [f"Result reused from run `{summary['computed_by']}`.", ""]
    lines += ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {sec:.3f} |" for name, sec in summary["seconds"].items()]
    lines += [f"| **total** | {sum(summary['seconds'].values()):.3f} |", ""]
    lines += ["## Result", "",
              f"- **{summary['result']}** sha256 `{summary['result_sha256']}`"]
    if "points" in summary:
        pts = summary["points"]
        lines.append(f"- points: {pts['total']} ({pts['failed']} failed)")
    s3 = summary["s3"]
    lines += ["", "## S3", "", f"- results: `{s3['results']}`"]
    if "input" in s3:
        lines.append(f"- input: `{s3['input']}`")
    manifest_uri = s3.get("manifest") or s3["results"] + MANIFEST
    lines += [f"- manifest: [{manifest_uri}]({manifest_url})"]
    for obj in s3.get("objects", []):
        lines.append(f"- `{obj}`")
    queues = summary.get("fanout", {}).get("queues", {})
    if queues:
        lines += ["", "## Fan-out", "", "| queue | events | verified | failed |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {q} | {v['events_received']} | {v['verified']} | {v['failed']} |"
                  for q, v in queues.items()]
    return "\n".join(lines) + "\n"


def point_rows(summary: dict[str, Any], manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per step point (steps), or per stage (one kernel)."""
    if summary.get("steps"):
        rows = []
        for step, info in summary["steps"].items():
            for p in info["points"]:
                rows.append({
                    "step": step, "point": p.get("point") or "", "state": p["state"],
                    "seconds": p.get("seconds"), "backend": p.get("backend", info["backend"]),
                    "job_id": p.get("job_id") or "",
                    "outputs": ", ".join(o["name"] for o in p.get("outputs", [])),
                    "error": p.get("error") or ""})
        return rows
    files = ", ".join(f["name"] for f in (manifest or {}).get("files", []))
    outputs = {"stage_in": summary["s3"].get("input", ""), "mpi_run": files,
               "fetch_result": files,
               "publish": ", ".join(Path(o).name for o in summary["s3"].get("objects", []))}
    return [{"step": stage, "point": "", "state": "Completed", "seconds": sec,
             "backend": summary["backend"] if stage == "mpi_run" else "",
             "job_id": "", "outputs": outputs.get(stage, ""), "error": ""}
            for stage, sec in summary["seconds"].items()]


def _picture_markdown(title: str, png: Path, s3_uri: str | None) -> str:
    uri = data_uri_png(png)
    body = f"![{title}]({uri})" if uri else f"(picture too large to embed: {png})"
    where = f"\n\nS3: `{s3_uri}`" if s3_uri else ""
    return f"# {title}\n\n{body}{where}\n"


def heat_picture(summary: dict[str, Any], out_dir: Path, work: Path) -> str | None:
    from flows.postprocess import render

    field = out_dir / "field.npy"
    if not field.is_file():
        return None
    png = render.fn(field, f"{summary['run_id']}: heat field", work / "field.png")
    return _picture_markdown(f"{summary['spec']}: heat field of {summary['run_id']}", png, None)


def var_table(out_dir: Path) -> list[dict[str, Any]]:
    r = json.loads((out_dir / "result.json").read_text())
    common = {"confidence": r["confidence"], "currency": r["currency"],
              "horizon_days": r["horizon_days"], "paths": r["paths"],
              "tail_paths": r["tail_paths"], "distribution": r["distribution"],
              "portfolio": r["portfolio"]}
    return [{"measure": "VaR", "value": r["var"], **common},
            {"measure": "ES", "value": r["es"], **common}]


def kmer_top(out_dir: Path, n: int = TOP_KMERS) -> list[dict[str, Any]]:
    rows = []
    with (out_dir / "counts.tsv").open() as f:
        for i, (kmer, count) in enumerate(csv.reader(f, delimiter="\t")):
            if i >= n:
                break
            rows.append({"rank": i + 1, "kmer": kmer, "count": int(count)})
    return rows


def kmer_histogram(summary: dict[str, Any], out_dir: Path, work: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [tuple(int(v) for v in line.split("\t"))
             for line in (out_dir / "histogram.tsv").read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.bar([c for c, _ in pairs], [m for _, m in pairs], width=0.8, color="#2a6fb0")
        ax.set_yscale("log")
        ax.set_xlabel("occurrences of a k-mer")
        ax.set_ylabel("distinct k-mers")
        ax.set_title(f"{summary['run_id']}: k-mer spectrum", fontsize=9)
        fig.tight_layout()
        work.mkdir(parents=True, exist_ok=True)
        png = work / "kmer-histogram.png"
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    return _picture_markdown(f"{summary['spec']}: k-mer histogram of {summary['run_id']}",
                             png, None)


def publish_run_artifacts(spec: PipelineSpec, summary: dict[str, Any],
                          aws: AwsTarget) -> list[str]:
    """Publish the run's artifacts; returns the keys published (see the module doc)."""
    logger = get_run_logger()
    phase_clock.mark("flow body")
    try:
        return _publish(spec, summary, aws)
    except Exception as e:  # noqa: BLE001 - the run's result stands without its artifacts
        logger.warning("could not publish the run's Prefect artifacts: %s", e)
        return []
    finally:
        phase_clock.mark("artifacts")


def _publish(spec: PipelineSpec, summary: dict[str, Any], aws: AwsTarget) -> list[str]:
    run_dir = Path(summary["scratch_dir"])
    out_dir = run_dir if summary.get("steps") is not None else run_dir / "out"
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    kernel = summary.get("kernel")
    keys = artifact_keys(spec.name, kernel)
    run_id = summary["run_id"]
    manifest_uri = summary["s3"].get("manifest") or summary["s3"]["results"] + MANIFEST
    manifest_url = presigned(aws, manifest_uri)

    made: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
        keys["summary"]: (create_markdown_artifact, {
            "markdown": summary_markdown(summary, manifest_url),
            "description": f"run {run_id}"}),
        keys["points"]: (create_table_artifact, {
            "table": point_rows(summary, manifest),
            "description": f"run {run_id}: state, seconds and outputs"}),
        keys["manifest"]: (create_link_artifact, {
            "link": manifest_url, "link_text": manifest_uri,
            "description": f"run {run_id}: the manifest (presigned)"}),
    }
    work = run_dir / "artifacts"
    if kernel == "heat":
        md = heat_picture(summary, out_dir, work)
        if md:
            made[keys["field"]] = (create_markdown_artifact, {
                "markdown": md, "description": f"run {run_id}: the final field"})
    elif kernel == "var":
        made[keys["var"]] = (create_table_artifact, {
            "table": var_table(out_dir),
            "description": f"run {run_id}: value at risk and expected shortfall"})
    elif kernel == "kmer":
        made[keys["kmer-top"]] = (create_table_artifact, {
            "table": kmer_top(out_dir), "description": f"run {run_id}: the top {TOP_KMERS} k-mers"})
        made[keys["kmer-histogram"]] = (create_markdown_artifact, {
            "markdown": kmer_histogram(summary, out_dir, work),
            "description": f"run {run_id}: the k-mer spectrum"})
    # Each is one request to the Prefect API and independent of the others: sent side by
    # side, each in a copy of this flow run's context (which names the run they belong to).
    with ThreadPoolExecutor(max_workers=len(made),
                            thread_name_prefix="clusterflow-artifacts") as pool:
        futures = [pool.submit(contextvars.copy_context().run, create, key=key, **kwargs)
                   for key, (create, kwargs) in made.items()]
        for future in futures:
            future.result()
    published = list(made)
    get_run_logger().info("published Prefect artifacts: %s", ", ".join(published))
    return published

