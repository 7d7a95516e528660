"""Every spec in examples/ runs with the one command the README gives for it.

The specs are run exactly as shipped, except for bucket names (each test gets its own) so
runs do not see each other's results.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from infra.aws.clients import AwsTarget
from infra.clusters.slurm_local import LocalSlurm, slurm_env
from tests.conftest import REPO, run_cli
from tests.slurm_fixtures import ensure_local_slurm

EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


@pytest.fixture(scope="session")
def debian_hpcc() -> Path:
    """Debian's `hpcc` (HPC Challenge, linked with Debian's Open MPI 4.1), installed the way
    `make slurm` installs Slurm: with apt-get when root and missing; never skipped."""
    if shutil.which("hpcc") is None or not Path("/usr/bin/mpirun").exists():
        assert os.geteuid() == 0, "install Debian's hpcc package (apt-get install hpcc)"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "hpcc"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
            proc = subprocess.run(install, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-2000:]
    return Path("/usr/bin/mpirun")


def _example(tmp_path: Path, name: str) -> Path:
    """The example's spec, beside its own files, with buckets of this test's own."""
    src = EXAMPLES / name / "spec.yaml"
    spec = yaml.safe_load(src.read_text())
    spec["storage"] = {"input_bucket": f"ex-{name}-in", "results_bucket": f"ex-{name}-out"}
    path = EXAMPLES / name / f".test-{os.getpid()}-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, env: dict[str, str], cwd: Path, *extra: str) -> dict:
    try:
        proc = run_cli(["run", "--spec", str(spec), "--json", *extra], env, cwd, timeout=600)
    finally:
        spec.unlink()
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _get(aws: AwsTarget, result: dict, key: str) -> bytes:
    url = urlparse(result["s3"]["results"])
    return aws.client("s3").get_object(Bucket=url.netloc,
                                       Key=url.path.lstrip("/") + key)["Body"].read()


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_heat_sweep_with_an_analysis_step(aws, cli_env, tmp_path, backend, request):
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    if backend == "slurm":
        cli_env.update(slurm_env(request.getfixturevalue("local_slurm").layout.root))
    result = _run(_example(tmp_path, "heat-sweep"), cli_env, tmp_path, "--backend", backend)
    points = result["steps"]["simulate"]["points"]
    assert len(points) == 6 and all(p["backend"] == backend for p in points)
    if backend == "slurm":
        assert len({p["job_id"].split("_")[0] for p in points}) == 1  # one job array
    rows = list(csv.DictReader(io.StringIO(_get(aws, result, "analyse/comparison.csv")
                                           .decode())))
    assert sorted((r["alpha"], r["shape"]) for r in rows) == sorted(
        (a, s) for a in ("0.05", "0.1", "0.2") for s in ("64x64", "96x128"))
    # Heat is conserved in the interior and leaks through Dirichlet walls: more diffusion
    # (larger alpha) on the same grid leaves a lower peak.
    for shape in ("64x64", "96x128"):
        peaks = [float(r["max"]) for r in sorted(rows, key=lambda r: float(r["alpha"]))
                 if r["shape"] == shape]
        assert peaks == sorted(peaks, reverse=True) and peaks[0] > peaks[-1]
    assert _get(aws, result, "analyse/comparison.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_own_mpi4py_program_gives_the_same_pi_on_any_rank_count(aws, cli_env, tmp_path):
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    two = _run(_example(tmp_path, "mpi4py-montecarlo"), cli_env, tmp_path)
    three = _run(_example(tmp_path, "mpi4py-montecarlo"), cli_env, tmp_path, "--ranks", "3")
    assert [p["point"] for p in two["steps"]["estimate"]["points"]] == [
        f"seed={i}" for i in range(4)]
    for seed in range(4):
        a = json.loads(_get(aws, two, f"estimate/seed={seed}/estimate.json"))
        b = json.loads(_get(aws, three, f"estimate/seed={seed}/estimate.json"))
        assert (a["ranks"], b["ranks"]) == (2, 3) and a["hits"] == b["hits"]
    pi = json.loads(_get(aws, two, "combine/pi.json"))
    assert abs(pi["pi"] - 3.14159) < 0.01 and pi["seeds"] == [0, 1, 2, 3]


def test_compiled_c_program_built_by_the_first_step(aws, cli_env, tmp_path):
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    result = _run(_example(tmp_path, "compiled-c"), cli_env, tmp_path)
    line = _get(aws, result, "ring/ring.txt").decode()
    assert line.startswith("ranks 4 rounds 1000 token 4000 ")
    built = result["steps"]["build"]["points"][0]["outputs"]
    assert [o["name"] for o in built] == ["ring"]


def test_debian_mpi_application_with_its_own_mpirun(aws, cli_env, tmp_path, debian_hpcc):
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    result = _run(_example(tmp_path, "debian-hpcc"), cli_env, tmp_path)
    summary = json.loads(_get(aws, result, "report/summary.json"))
    assert summary["Success"] == 1 and summary["CommWorldProcs"] == 2
    assert summary["HPL_Tflops"] > 0
    (hpcc,) = result["steps"]["hpcc"]["points"]
    assert [o["name"] for o in hpcc["outputs"]] == ["hpccoutf.txt"]
