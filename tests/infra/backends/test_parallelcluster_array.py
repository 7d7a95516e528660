"""A sweep's job array on ParallelCluster: one batch script, one arm per point.

The script is run with bash as Slurm runs each element (``SLURM_ARRAY_TASK_ID`` set), without
Slurm: each element must run exactly its own argv with its own env, values from a spec quoted
(``=``, ``,``, quotes, ``$(...)`` stay text), and leave ``<job>_<index>.exitcode`` with its
own exit code and, on a Spot queue, ``<job>_<index>.attempts`` (the names ``status`` reads).
The whole path through the real local Slurm is tests/flows/test_pc_shared_sweep.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infra.backends.providers.base import ArrayItem
from infra.backends.providers.parallelcluster import ParallelClusterProvider
from infra.backends.remote_shell import LocalShell

HOSTILE = "alpha=0.1,n=3 'q' \"d\" $(touch pwned) `id`"
ECHO = ("import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['P']])); "
        "sys.exit(int(sys.argv[1]))")


def _items(tmp_path: Path) -> list[ArrayItem]:
    return [ArrayItem(i, [sys.executable, "-c", ECHO, str(i), HOSTILE], tmp_path,
                      {"P": f"{HOSTILE} #{i}"}) for i in (0, 3)]


@pytest.mark.parametrize("requeue", [False, True])
def test_each_element_runs_its_own_quoted_command_and_leaves_its_own_records(
        tmp_path: Path, requeue: bool) -> None:
    root = tmp_path / "fsx"
    d = root / "run-1"
    d.mkdir(parents=True)
    provider = ParallelClusterProvider(LocalShell(), remote_root=str(root), requeue=requeue,
                                       max_interruptions=2)
    script = provider.array_script(_items(tmp_path), ranks=2, job_name="sim",
                                   directory=str(d), max_parallel=2)
    lines = script.splitlines()
    assert "#SBATCH --array=0,3%2" in lines
    assert f"#SBATCH --output={d}/sim_%a.out" in lines
    assert ("#SBATCH --requeue" in lines) is requeue
    first_command = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH")) < first_command
    (d / "sim.sbatch").write_text(script)
    for index in (0, 3):
        proc = subprocess.run(["bash", str(d / "sim.sbatch")], cwd=d, capture_output=True,
                              text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": str(index)})
        assert proc.returncode == index, proc.stderr
        assert json.loads(proc.stdout) == [[str(index), HOSTILE], f"{HOSTILE} #{index}"]
        assert (d / f"sim_{index}.exitcode").read_text().split() == [str(index), "0"]
        assert (d / f"sim_{index}.attempts").is_file() is requeue
    assert not list(tmp_path.rglob("pwned"))
    other = subprocess.run(["bash", str(d / "sim.sbatch")], cwd=d, capture_output=True,
                           text=True, timeout=60, env={"SLURM_ARRAY_TASK_ID": "1"})
    assert other.returncode == 2 and "no command for array index 1" in other.stderr


def test_the_submit_script_clears_every_elements_old_records(tmp_path: Path) -> None:
    provider = ParallelClusterProvider(LocalShell(), remote_root="/fsx/cf", run_as=None)
    text = provider.submit_script("#!/bin/bash\n", directory="/fsx/cf/r1", job_name="sim",
                                  stems=["sim_0", "sim_3"])
    rm = next(ln for ln in text.splitlines() if ln.startswith("rm -f "))
    assert rm.split()[2:] == [f"/fsx/cf/r1/sim_{i}.{e}" for i in (0, 3)
                              for e in ("exitcode", "attempts")]
    single = provider.submit_script("#!/bin/bash\n", directory="/fsx/cf/r1",
                                                         job_name="heat")
    assert "rm -f /fsx/cf/r1/heat.exitcode /fsx/cf/r1/heat.attempts" in single


LAUNCH_FAILED = ("import sys; print('srun: error: task 1 launch failed: Unspecified error', "
                 "file=sys.stderr)")


def test_an_srun_that_exits_0_after_a_launch_failure_fails_the_job(tmp_path: Path) -> None:
    # Slurm 22.05's srun exits 0 when its tasks never launch (see test_slurm.py); the exit
    # trap reads what this attempt wrote to the .err file (Slurm points stderr there) and
    # turns that 0 into 126, in the exit code file status() reads and in the job's own exit.
    d = tmp_path / "run-1"
    d.mkdir()
    provider = ParallelClusterProvider(LocalShell(), remote_root=str(tmp_path))

    def run(script: str, stem: str, index: int | None = None) -> int:
        (d / "job.sbatch").write_text(script)
        env = {"PATH": "/usr/bin:/bin"} | ({} if index is None else
                                          {"SLURM_ARRAY_TASK_ID": str(index)})
        with (d / f"{stem}.err").open("ab") as err:
            return subprocess.run(["bash", str(d / "job.sbatch")], cwd=d, stderr=err,
                                  stdout=subprocess.DEVNULL, env=env, timeout=60).returncode

    bad = provider.batch_script([sys.executable, "-c", LAUNCH_FAILED], ranks=2,
                                job_name="heat", directory=str(d), env=None)
    assert run(bad, "heat") == 126
    assert (d / "heat.exitcode").read_text().split() == ["126", "0"]
    assert "srun exited 0 but its tasks did not all launch" in (d / "heat.err").read_text()
    # A later attempt that runs (a requeue appends to the same .err) is judged on its own
    ok = provider.batch_script([sys.executable, "-c", "pass"], ranks=2, job_name="heat",
                               directory=str(d), env=None)
    assert run(ok, "heat") == 0
    assert (d / "heat.exitcode").read_text().split() == ["0", "0"]
    # A command's own failure keeps its own code
    three = provider.batch_script([sys.executable, "-c", LAUNCH_FAILED + "; sys.exit(3)"],
                                  ranks=2, job_name="heat", directory=str(d), env=None)
    assert run(three, "heat") == 3
    # and each array element is judged by its own .err
    items = [ArrayItem(0, [sys.executable, "-c", "pass"], tmp_path, {}),
             ArrayItem(1, [sys.executable, "-c", LAUNCH_FAILED], tmp_path, {})]
    array = provider.array_script(items, ranks=2, job_name="sim", directory=str(d),
                                  max_parallel=2)
    assert [run(array, f"sim_{i}", i) for i in (0, 1)] == [0, 126]
    assert (d / "sim_1.exitcode").read_text().split() == ["126", "0"]
