"""Prefect artifacts of real pipeline runs, read back from the real Prefect server by key.

Runs go through the CLI (real ranks, the moto server, the session's Prefect server); the
artifacts are compared with what the run published to S3, so a table or picture that does
not describe this run's bytes fails.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.postprocess import render
from flows.spec import DEFAULT_SPEC
from infra.aws.clients import AwsTarget
from tests.conftest import REPO, run_cli


def _spec(tmp_path: Path, name: str, kernel: dict) -> Path:
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec["name"] = name
    spec["kernel"] = kernel
    spec["storage"] = {"input_bucket": f"{name}-in", "results_bucket": f"{name}-out"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, env: dict[str, str], cwd: Path, expect: int = 0) -> dict:
    proc = run_cli(["run", "--spec", str(spec), "--json"], env, cwd, timeout=400)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _artifacts(api: str, key: str) -> list:
    """Every artifact stored under ``key``, newest first (the UI's history)."""
    async def read() -> list:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC)

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(read())


def _s3(aws: AwsTarget, result: dict, name: str) -> bytes:
    url = urlparse(result["s3"]["results"])
    return aws.client("s3").get_object(Bucket=url.netloc,
                                       Key=url.path.lstrip("/") + name)["Body"].read()


def _embedded_png(markdown: str) -> bytes:
    m = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert m, markdown[:300]
    return base64.b64decode(m.group(1))


def _table(artifact) -> list[dict]:
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data


def test_heat_runs_publish_summary_points_and_field_with_history(
        aws, cli_env, prefect_api, tmp_path):
    spec = _spec(tmp_path, "art-heat", {
        "name": "heat", "parameters": {"nx": 40, "ny": 30, "steps": 20, "alpha": 0.2}})
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    first = _run(spec, cli_env, tmp_path)
    second = _run(spec, cli_env, tmp_path)
    assert second["artifacts"] == ["art-heat-summary", "art-heat-points", "art-heat-manifest",
                                   "art-heat-field"]

    summaries = _artifacts(prefect_api, "art-heat-summary")
    # One key, one entry per run: the UI's history of this spec.
    assert [a.description for a in summaries[:2]] == [f"run {second['run_id']}",
                                                      f"run {first['run_id']}"]
    md = summaries[0].data
    assert summaries[0].type == "markdown" and summaries[0].flow_run_id is not None
    # All four belong to the run's own flow run (they are created side by side in threads).
    assert {_artifacts(prefect_api, key)[0].flow_run_id for key in second["artifacts"]} == {
        summaries[0].flow_run_id}
    assert second["result_sha256"] in md and second["s3"]["results"] in md
    for stage in ("provision", "stage_in", "mpi_run", "publish", "consume"):
        assert f"| {stage} | {second['seconds'][stage]:.3f} |" in md
    # The manifest link opens the published manifest (moto serves the presigned URL).
    link = _artifacts(prefect_api, "art-heat-manifest")[0]
    # Prefect stores a link artifact as markdown: [text](url).
    url = re.fullmatch(r"\[(.+)\]\((.+)\)", link.data).group(2)
    assert url.startswith(aws.endpoint_url)
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == _s3(aws, second, "manifest.json")

    points = _table(_artifacts(prefect_api, "art-heat-points")[0])
    assert [p["step"] for p in points] == list(second["seconds"])
    assert {p["step"]: p["seconds"] for p in points} == second["seconds"]
    assert next(p for p in points if p["step"] == "mpi_run")["outputs"] == "field.npy"

    # The picture is the published field's, rendered exactly as the on-result flow does.
    field = _artifacts(prefect_api, "art-heat-field")[0]
    png = _embedded_png(field.data)
    local = tmp_path / "field.npy"
    local.write_bytes(_s3(aws, second, "field.npy"))
    expected = render.fn(local, f"{second['run_id']}: heat field", tmp_path / "expected.png")
    assert png == expected.read_bytes()
    import matplotlib.image
    assert matplotlib.image.imread(io.BytesIO(png), format="png").shape[:2] == (500, 600)
    np.testing.assert_array_equal(np.load(local).shape, (30, 40))


def test_var_and_kmer_runs_publish_their_tables_and_histogram(
        aws, cli_env, prefect_api, tmp_path):
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    var = _run(_spec(tmp_path, "art-var", {
        "name": "var", "parameters": {"paths": 20000, "confidence": 0.975}}),
        cli_env, tmp_path)
    result = json.loads(_s3(aws, var, "result.json"))
    table = _table(_artifacts(prefect_api, "art-var-var")[0])
    assert [(r["measure"], r["value"], r["confidence"]) for r in table] == [
        ("VaR", result["var"], 0.975), ("ES", result["es"], 0.975)]
    assert var["artifacts"][-1] == "art-var-var"

    kmer = _run(_spec(tmp_path, "art-kmer", {
        "name": "kmer", "parameters": {"k": 5, "genome_length": 20000, "reads": 2000,
                                       "read_length": 100}}), cli_env, tmp_path)
    counts = _s3(aws, kmer, "counts.tsv").decode().splitlines()
    top = _table(_artifacts(prefect_api, "art-kmer-kmer-top")[0])
    assert [(r["kmer"], r["count"]) for r in top] == [
        (line.split("\t")[0], int(line.split("\t")[1])) for line in counts[:20]]
    hist = _artifacts(prefect_api, "art-kmer-kmer-histogram")[0]
    assert hist.description.startswith(f"run {kmer['run_id']}:")
    assert _embedded_png(hist.data).startswith(b"\x89PNG\r\n\x1a\n")


def test_a_sweep_publishes_one_row_per_point(aws, cli_env, prefect_api, tmp_path):
    fix = REPO / "tests" / "fixtures" / "steps"
    spec = tmp_path / "art-sweep.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "art-sweep", "ranks": 2,
        "storage": {"input_bucket": "art-sweep-in", "results_bucket": "art-sweep-out"},
        "steps": [{"name": "sq", "launcher": "none", "ranks": 1, "outputs": ["value.json"],
                   "command": ["python", str(fix / "point.py"), "{params.x}", "{out}"],
                   "sweep": {"x": {"range": [0, 4]}}}]}))
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    result = _run(spec, cli_env, tmp_path)
    rows = _table(_artifacts(prefect_api, "art-sweep-points")[0])
    assert [(r["step"], r["point"], r["state"], r["outputs"]) for r in rows] == [
        ("sq", f"x={i}", "completed", "value.json") for i in range(4)]
    assert all(isinstance(r["seconds"], float) for r in rows)
    md = _artifacts(prefect_api, "art-sweep-summary")[0].data
    assert result["result_sha256"] in md and "points: 4 (0 failed)" in md
