"""A ``steps:`` sweep and its fan-in on parallelcluster where the storage is mounted.

clusterflow runs where the cluster's storage is mounted (``scratch_dir`` is the cluster's
``remote_root``), so the run directory is the ranks' directory and nothing stages through FSx.
The cluster is the head-node stand-in of tests/flows/test_fsx_pipeline.py: the provider's real
batch scripts through ``LocalShell`` against the local Slurm, real mpiexec ranks, S3 the
embedded moto endpoint. The sweep has two parameters, so its point folders hold both '=' and
',' (``alpha=0.1,n=3``); each point's ranks read their value from the command line and from
the step's env, and the fan-in reads every point's output through its ``in/`` links. Run
twice: the whole spec on parallelcluster, and a local spec whose sweep step alone says
``backend: parallelcluster`` (the fan-in then runs on this machine, the head node).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.fsx_checks import shared_mount, uses_fsx
from flows.spec import load_spec
from infra.clusters.slurm_local.cluster import LocalSlurm
from tests.flows.test_fsx_pipeline import World
from tests.flows.test_fsx_steps import run_flow
from tests.slurm_fixtures import ensure_local_slurm

ALPHAS = (0.1, 0.2, 0.3)
# Every rank adds its share; rank 0 writes what it saw, the env included. (No braces: in a
# step's command they are placeholders.)
RANKS = """\
import os, sys
from mpi4py import MPI
c = MPI.COMM_WORLD
total = c.allreduce(int(sys.argv[2]) * (c.rank + 1))
if c.rank == 0:
    seen = [sys.argv[1], str(c.size), str(total), os.environ["POINT_ALPHA"],
            os.environ["CLUSTERFLOW_POINT"]]
    with open(os.path.join(sys.argv[3], "value.txt"), "w") as f:
        f.write(" ".join(seen) + "\\n")
    print("point done:", os.environ["CLUSTERFLOW_POINT"], flush=True)
"""
FAN_IN = """\
import pathlib, sys
root = pathlib.Path(sys.argv[1])
rows = [d.name + ": " + (d / "value.txt").read_text().strip() for d in sorted(root.iterdir())]
pathlib.Path(sys.argv[2]).write_text("\\n".join(rows) + "\\n")
"""


@pytest.fixture(scope="session")
def local_slurm() -> LocalSlurm:
    return ensure_local_slurm()


def shared_world(aws: Any, tmp_path: Path, top: str = "parallelcluster") -> World:
    """World's buckets and head node, with clusterflow running on the cluster's mount; with
    ``top`` local, only the sweep says ``backend: parallelcluster`` (the fan-in runs here)."""
    world = World(aws, tmp_path)
    raw = yaml.safe_load(world.spec_path.read_text())
    del raw["kernel"]
    raw["scratch_dir"] = world.remote_root
    raw["backend"] = top
    raw["steps"] = [
        {"name": "sim", "command": ["python", "-c", RANKS, "{params.alpha}", "{params.n}",
                                    "{out}"],
         "launcher": "mpiexec", "env": {"POINT_ALPHA": "{params.alpha}"},
         "sweep": {"alpha": list(ALPHAS), "n": [3], "max_parallel": 2},
         "outputs": ["value.txt"], "backend": "parallelcluster"},
        {"name": "total", "command": ["python", "-c", FAN_IN, "{inputs.vals}",
                                      "{out}/total.txt"],
         "inputs": {"vals": "steps.sim.outputs/value.txt"}, "launcher": "none",
         "outputs": ["total.txt"]},
    ]
    world.spec_path.write_text(yaml.safe_dump(raw))
    return world


def _get(world: World, key: str) -> bytes:
    return world.aws.client("s3").get_object(Bucket=world.results, Key=key)["Body"].read()


def _completion_log(local_slurm: LocalSlurm) -> list[str]:
    conf = (local_slurm.layout.root / "slurm.conf").read_text()
    comp = Path(next(ln.split("=", 1)[1] for ln in conf.splitlines()
                     if ln.startswith("JobCompLoc=")))
    return comp.read_text().splitlines()


@pytest.mark.parametrize("top", ["parallelcluster", "local"])
def test_a_sweep_on_the_shared_mount_runs_as_one_job_array_and_fans_in(
        aws, local_slurm, prefect_api, tmp_path, monkeypatch, top):
    world = shared_world(aws, tmp_path, top)
    spec = load_spec(world.spec_path)
    assert shared_mount(spec) and not uses_fsx(spec)
    run_id = "pc-shared-sweep"
    summary = run_flow(world, local_slurm, None, run_id, prefect_api, monkeypatch, tmp_path)
    assert summary["state"] == "succeeded", summary
    assert summary["points"] == {"total": 4, "failed": 0}
    assert summary["steps"]["total"]["points"][0]["backend"] == top
    labels = [f"alpha={a},n=3" for a in ALPHAS]
    sim = {p["point"]: p for p in summary["steps"]["sim"]["points"]}
    assert sorted(sim) == labels
    assert all(p["state"] == "completed" and p["backend"] == "parallelcluster"
               for p in sim.values())
    # The sweep went to Slurm as ONE job array, max_parallel at a time, one element a point.
    arrays = {p["job_id"].split("_")[0] for p in sim.values()}
    assert len(arrays) == 1, sim
    (array_id,) = arrays
    assert sorted(p["job_id"] for p in sim.values()) == [f"{array_id}_{i}" for i in range(3)]
    run_dir = Path(world.remote_root) / run_id
    script = (run_dir / "sim.sbatch").read_text()
    assert "--array=0,1,2%2" in script
    done = [ln for ln in _completion_log(local_slurm) if f" ArrayJobId={array_id} " in ln]
    assert sorted(int(ln.split(" ArrayTaskId=")[1].split()[0]) for ln in done) == [0, 1, 2]
    assert all("JobState=COMPLETED" in ln for ln in done)
    # Each point ran on 2 ranks in its own folder, with its own values and env.
    prefix = f"runs/{run_id}/"
    for a, label in zip(ALPHAS, labels, strict=True):
        assert _get(world, f"{prefix}sim/{label}/value.txt").decode() == \
            f"{a} 2 9 {a} {label}\n"
        assert (run_dir / "sim" / label / "out" / "value.txt").is_file()
        step_json = json.loads(_get(world, f"{prefix}sim/{label}/step.json"))
        assert step_json["job_id"] == sim[label]["job_id"]
    # The fan-in saw every point, through one sub-folder each.
    assert _get(world, prefix + "total/total.txt").decode() == "".join(
        f"{label}: {a} 2 9 {a} {label}\n" for a, label in zip(ALPHAS, labels, strict=True))
    manifest = json.loads(_get(world, prefix + "manifest.json"))
    assert manifest["state"] == "succeeded"
    names = {e["name"] for e in manifest["files"]}
    assert {f"sim/{label}/value.txt" for label in labels} | {"total/total.txt"} <= names
    for entry in manifest["files"]:  # every listed file is in S3 with that sha256
        assert hashlib.sha256(_get(world, prefix + entry["name"])).hexdigest() \
            == entry["sha256"]
    # Each element's log is where Slurm wrote it, read in place: never appended to itself.
    for i, label in enumerate(labels):
        assert (run_dir / f"sim_{i}.out").read_text() == f"point done: {label}\n"
