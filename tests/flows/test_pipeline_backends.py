"""The same pipeline on every kernel and on the slurm backend, through the real CLI.

Each run goes the whole way (moto server, staging, ranks, publish, fan-out, consume); what is
checked is the published result against a serial reference computed here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml

from flows.spec import DEFAULT_SPEC
from infra.aws.clients import AwsTarget
from infra.clusters.slurm_local.cluster import LocalSlurm
from infra.clusters.slurm_local.layout import slurm_env
from infra.staging.objects import sha256_file
from mpi_jobs.heat import reference_solution
from mpi_jobs.initial_conditions import heat_hotspots
from mpi_jobs.kmer_reference import count_kmers, top
from mpi_jobs.montecarlo import MonteCarlo, reference_var
from mpi_jobs.portfolio import load_portfolio
from tests.conftest import run_cli
from tests.slurm_fixtures import ensure_local_slurm


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def _spec(tmp_path: Path, name: str, kernel: dict, **changes: object) -> Path:
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec["kernel"] = kernel
    spec["storage"] = {"input_bucket": f"{name}-inputs", "results_bucket": f"{name}-results"}
    spec.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, env: dict[str, str], cwd: Path, *extra: str) -> dict:
    proc = run_cli(["run", "--spec", str(spec), "--json", *extra], env, cwd, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _published(aws: AwsTarget, result: dict, name: str, dest: Path) -> Path:
    url = urlparse(result["s3"]["results"])
    aws.client("s3").download_file(url.netloc, url.path.lstrip("/") + name, str(dest))
    return dest


def test_var_kernel_publishes_the_serial_answer_for_any_rank_count(aws, cli_env, tmp_path):
    params = {"paths": 30_011, "block_paths": 4096, "seed": 7, "confidence": 0.99}
    spec = _spec(tmp_path, "var", {"name": "var", "parameters": params})
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    one = _run(spec, cli_env, tmp_path, "--ranks", "1")
    three = _run(spec, cli_env, tmp_path, "--ranks", "3")
    assert one["kernel"] == "var" and one["result"] == "result.json"
    got = [json.loads(_published(aws, r, "result.json", tmp_path / f"r{i}.json").read_text())
           for i, r in enumerate((one, three))]
    mc = MonteCarlo.build(load_portfolio(None)[0], distribution="normal", df=5.0, seed=7,
                          paths=30_011, block_paths=4096)
    var, es = reference_var(mc, 0.99)
    for r in got:
        assert (r["var"], r["es"]) == (var, es)  # exact, not approximately
    assert one["fanout"]["queues"]["audit"]["verified"] == 1

    # The on-result flow summarises a run without a field too (no picture to draw).
    key = urlparse(three["s3"]["results"]).path.lstrip("/") + "manifest.json"
    code = ("import json, sys; from flows.postprocess import postprocess; "
            "print(json.dumps(postprocess(key=sys.argv[1], spec_path=sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, key, str(spec)], env=cli_env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kernel"] == "var" and "result.json" in summary["files"]
    stored = _published(aws, three, "summary.json", tmp_path / "summary.json")
    assert json.loads(stored.read_text())["files"] == summary["files"]


def test_kmer_kernel_counts_the_generated_reads_like_a_serial_counter(aws, cli_env, tmp_path):
    params = {"k": 11, "top": 25, "genome_length": 20_000, "reads": 600, "read_length": 90,
              "seed": 3}
    spec = _spec(tmp_path, "kmer", {"name": "kmer", "parameters": params}, ranks=3)
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    result = _run(spec, cli_env, tmp_path)
    assert result["s3"]["input"].endswith(".fastq.gz")
    staged = Path(result["scratch_dir"]) / "in" / result["s3"]["input"].rsplit("/", 1)[1]
    expected = "".join(f"{kmer}\t{c}\n" for kmer, c in top(count_kmers(staged, 11), 25))
    counts = _published(aws, result, "counts.tsv", tmp_path / "counts.tsv")
    assert counts.read_text() == expected
    assert sha256_file(counts) == result["result_sha256"]


def test_heat_on_the_slurm_backend_equals_the_reference(aws, cli_env, tmp_path, local_slurm):
    params = {"nx": 40, "ny": 27, "steps": 30, "alpha": 0.2}
    spec = _spec(tmp_path, "slurm", {"name": "heat", "parameters": params,
                                     "checkpoint_every": 10},
                 slurm={"overcommit": True, "time_limit": "5"})
    cli_env.update(slurm_env(local_slurm.layout.root), AWS_ENDPOINT_URL=aws.endpoint_url)
    result = _run(spec, cli_env, tmp_path, "--backend", "slurm", "--ranks", "2")
    assert result["backend"] == "slurm"
    field = _published(aws, result, "field.npy", tmp_path / "field.npy")
    assert np.array_equal(np.load(field), reference_solution(heat_hotspots(27, 40), 30, 0.2))
    run_dir = Path(result["scratch_dir"])
    assert any((run_dir / "checkpoints").iterdir())  # the kernel checkpointed as asked
    script = (run_dir / "heat.sbatch").read_text()  # what was submitted, resubmittable by hand
    assert "sbatch --parsable" in script and "--time=5" in script and "srun" in script


def test_uploaded_input_sets_the_grid(aws, cli_env, tmp_path):
    """What the on-upload deployment does: run on a user's own field, its shape decides."""
    from infra.staging.objects import upload

    spec = _spec(tmp_path, "upload", {"name": "heat", "parameters": {"steps": 5}})
    field = heat_hotspots(19, 23, seed=4)
    np.save(tmp_path / "mine.npy", field)
    aws.client("s3").create_bucket(Bucket="upload-inputs")
    upload(aws, tmp_path / "mine.npy", "upload-inputs", "inputs/uploads/mine.npy")
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    from flows.spec import load_spec

    raw = yaml.safe_load(spec.read_text())
    raw["kernel"]["input_key"] = "inputs/uploads/mine.npy"
    spec.write_text(yaml.safe_dump(raw))
    load_spec(spec)  # the key is accepted as is
    result = _run(spec, cli_env, tmp_path)
    out = _published(aws, result, "field.npy", tmp_path / "field.npy")
    assert np.array_equal(np.load(out), reference_solution(field, 5, 0.2))


def test_unreachable_slurm_is_reported_before_anything_is_created(aws, cli_env, tmp_path):
    spec = _spec(tmp_path, "noslurm", {"name": "heat"})
    cli_env.update(SLURM_CONF=str(tmp_path / "missing" / "slurm.conf"),
                   AWS_ENDPOINT_URL=aws.endpoint_url)
    proc = run_cli(["run", "--spec", str(spec), "--backend", "slurm"], cli_env, tmp_path,
                   timeout=120)
    assert proc.returncode == 1
    assert "SlurmUnavailable" in proc.stderr and "set SLURM_CONF" in proc.stderr
    names = {b["Name"] for b in aws.client("s3").list_buckets()["Buckets"]}
    assert "noslurm-inputs" not in names and "noslurm-results" not in names


@pytest.mark.parametrize("backend", ["parallelcluster", "batch"])
def test_cloud_backend_without_its_section_is_refused(cli_env, tmp_path, backend):
    spec = _spec(tmp_path, "cloud", {"name": "heat"})
    proc = run_cli(["run", "--spec", str(spec), "--backend", backend], cli_env, tmp_path,
                   timeout=60)
    assert proc.returncode == 2
    assert f"backend '{backend}' needs a '{backend}:' section" in proc.stderr
    assert not (tmp_path / ".clusterflow").exists()


def test_reuse_result_skips_the_kernel_for_the_same_input_and_parameters(aws, cli_env, tmp_path):
    spec = _spec(tmp_path, "reuse", {"name": "heat", "parameters": {"nx": 33, "ny": 21,
                                                                    "steps": 12}},
                 reuse_result=True)
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    first = _run(spec, cli_env, tmp_path, "--ranks", "2")
    second = _run(spec, cli_env, tmp_path, "--ranks", "3")  # any rank count, same bits
    assert first["computed_by"] == first["run_id"]
    assert second["computed_by"] == first["run_id"]
    assert "fetch_result" in second["seconds"]
    assert not (Path(second["scratch_dir"]) / "heat.out").exists()  # no job ran
    assert second["result_sha256"] == first["result_sha256"]
    field = _published(aws, second, "field.npy", tmp_path / "second.npy")  # its own prefix
    assert np.array_equal(np.load(field), reference_solution(heat_hotspots(21, 33), 12, 0.2))
    assert second["fanout"]["queues"]["postprocess"]["verified"] == 1

    # Once the earlier outputs are gone, the record is useless: compute again, loudly.
    s3, url = aws.client("s3"), urlparse(first["s3"]["results"])
    for obj in s3.list_objects_v2(Bucket=url.netloc, Prefix=url.path.lstrip("/"))["Contents"]:
        s3.delete_object(Bucket=url.netloc, Key=obj["Key"])
    third = _run(spec, cli_env, tmp_path)
    assert third["computed_by"] == third["run_id"]
    assert third["result_sha256"] == first["result_sha256"]

    # Different parameters are a different result.
    raw = yaml.safe_load(spec.read_text())
    raw["kernel"]["parameters"]["steps"] = 13
    spec.write_text(yaml.safe_dump(raw))
    fourth = _run(spec, cli_env, tmp_path)
    assert fourth["computed_by"] == fourth["run_id"]


def test_a_kernel_whose_ranks_never_launch_runs_once_more_then_fails(aws, cli_env, tmp_path,
                                                                     local_slurm):
    # sbatch hands the caller's environment to the job, so SLURM_STDOUTMODE reaches the srun
    # inside it: its tasks cannot open their output and never start; srun exits 0. The guard
    # fails the job (126), the run tries once more (nothing ran) and then fails saying so.
    params = {"nx": 16, "ny": 16, "steps": 2, "alpha": 0.2}
    spec = _spec(tmp_path, "neverup", {"name": "heat", "parameters": params},
                 slurm={"overcommit": True})
    cli_env.update(slurm_env(local_slurm.layout.root), AWS_ENDPOINT_URL=aws.endpoint_url,
                   SLURM_STDOUTMODE=str(tmp_path / "no-such-dir" / "o%t"))
    proc = run_cli(["run", "--spec", str(spec), "--backend", "slurm", "--ranks", "2"],
                   cli_env, tmp_path, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "srun exited 0 but 2 task launch(es) failed" in proc.stderr
    assert "Retry 1/1" in proc.stderr  # the one run more, and no other
    assert "Retry 2/" not in proc.stderr
    assert "Traceback" not in proc.stderr.split("error:")[-1]
