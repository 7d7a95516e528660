"""Issue 13, class 1: a spec value must never become shell code in a generated script.

A newline in ``slurm.sbatch_args`` once broke out of the comment that records the ``sbatch``
line in the batch script, and the rest ran on the cluster. Every string a spec holds is now
refused when it has a control character, with the field named, before anything is created.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.spec import DEFAULT_SPEC, SpecError, load_spec
from tests.conftest import BIN

PC_CONFIG = Path(__file__).resolve().parents[2] / "cluster_configs" / "efa-spot-us-east-1.yaml"


def _spec(tmp_path: Path, **changes: object) -> Path:
    doc = yaml.safe_load(DEFAULT_SPEC.read_text())
    doc.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _pc(**changes: object) -> dict:
    return {"config": str(PC_CONFIG), "cluster_name": "heat", **changes}


@pytest.mark.parametrize(("changes", "field"), [
    ({"slurm": {"sbatch_args": ["--exclusive", "--comment=x\ntouch /tmp/pwned"]}},
     "slurm.sbatch_args"),
    ({"slurm": {"partition": "compute\nrm -rf ~"}}, "slurm.partition"),
    ({"slurm": {"time_limit": "10\n"}}, "slurm.time_limit"),
    ({"slurm": {"conf": "/etc/slurm/slurm.conf\nx"}}, "slurm.conf"),
    ({"scratch_dir": "/tmp/scratch\ntouch /tmp/pwned"}, "scratch_dir"),
    ({"kernel": {"name": "heat", "input_key": "inputs/a\rb.npy"}}, "kernel.input_key"),
    ({"storage": {"input_bucket": "in-bucket", "results_bucket": "out-bucket",
                  "input_prefix": "in\n"}}, "storage.input_prefix"),
    ({"storage": {"input_bucket": "in-bucket\n", "results_bucket": "out-bucket"}},
     "storage.input_bucket"),
    ({"backend": "parallelcluster", "parallelcluster": _pc(python="python3\nid")},
     "parallelcluster.python"),
    ({"backend": "parallelcluster", "parallelcluster": _pc(run_as="ec2-user\t")},
     "parallelcluster.run_as"),
    ({"backend": "parallelcluster", "parallelcluster": _pc(remote_root="/fsx; touch /x")},
     "parallelcluster.remote_root"),
    ({"backend": "parallelcluster", "parallelcluster": _pc(remote_root="/fsx/$(id)")},
     "parallelcluster.remote_root"),
])
def test_control_characters_and_shell_syntax_are_refused_naming_the_field(
        tmp_path: Path, changes: dict, field: str) -> None:
    with pytest.raises(SpecError) as e:
        load_spec(_spec(tmp_path, **changes))
    lines = str(e.value).splitlines()[1:]
    assert any(line.strip().startswith(f"{field}:") for line in lines), str(e.value)


def test_odd_but_safe_values_are_kept_literally(tmp_path: Path) -> None:
    args = ["--comment=a b;c $(touch x) `touch y` 'q\"", "--exclusive"]
    spec = load_spec(_spec(tmp_path, slurm={"sbatch_args": args, "partition": "a-b_c"}))
    assert spec.slurm.sbatch_args == args


def test_the_cli_refuses_such_a_spec_with_exit_2_and_creates_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    spec = _spec(tmp_path, backend="slurm",
                 slurm={"sbatch_args": [f"--comment=ok\ntouch {marker}"]},
                 scratch_dir=str(tmp_path / "scratch"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))}
    env["CLUSTERFLOW_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([str(BIN / "clusterflow"), "run", "--spec", str(spec)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "slurm.sbatch_args: item [0]" in proc.stderr and "newline" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists() and not (tmp_path / "scratch").exists()
    assert not marker.exists()
