"""The step graph is checked as a whole before anything exists: each mistake is one line that
names its field, and the CLI refuses the spec with exit 2 while the endpoint stays empty."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from flows.spec import SpecError, load_spec
from flows.steps.placeholders import PlaceholderError, fill, names_in
from tests.conftest import run_cli

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "steps"
STORAGE = {"input_bucket": "steps-graph-in", "results_bucket": "steps-graph-out"}


def _write(tmp_path: Path, steps: list[dict], **extra: object) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "graph", "storage": STORAGE, "steps": steps,
                                    **extra}))
    return path


def _point(name: str, **kw: object) -> dict:
    return {"name": name, "command": ["python", str(FIX / "point.py"), "1", "{out}"],
            "launcher": "none", **kw}


def _refusal(tmp_path: Path, steps: list[dict]) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(_write(tmp_path, steps))
    return str(e.value)


def test_a_valid_graph_expands_sweeps_into_labelled_points(tmp_path):
    from flows.spec import step_plan

    path = _write(tmp_path, [
        {"name": "sim", "uses": "heat", "parameters": {"nx": 16, "ny": 16, "steps": 2},
         "sweep": {"alpha": [0.1, 0.2], "points": [{"seed": 1}, {"seed": 2}]}},
        {"name": "per", "command": ["python", "{spec_dir}/x.py", "{inputs.f}"],
         "inputs": {"f": "steps.sim.outputs/field.npy"}, "per_point": True,
         "launcher": "none"},
        {"name": "all", "command": ["true", "{inputs.f}"], "launcher": "none",
         "inputs": {"f": "steps.sim.outputs"}, "needs": ["per"]},
    ])
    plan = step_plan(load_spec(path), path)
    assert list(plan.steps) == ["sim", "per", "all"]
    labels = [p.label for p in plan.points["sim"]]
    assert labels == ["seed=1,alpha=0.1", "seed=1,alpha=0.2", "seed=2,alpha=0.1",
                      "seed=2,alpha=0.2"]
    assert plan.points["sim"][3].params == {"nx": 16, "ny": 16, "steps": 2, "seed": 2,
                                             "alpha": 0.2}
    # per_point: one point per upstream point, each waiting for its own upstream only.
    assert [p.upstream for p in plan.points["per"]] == [(("sim", lab),) for lab in labels]
    assert [p.task_name for p in plan.points["per"]][0] == "per[seed=1,alpha=0.1]"
    # fan-in: one point that waits for every point of both upstream steps.
    (fan_in,) = plan.points["all"]
    assert set(fan_in.upstream) == {("sim", lab) for lab in labels} | {("per", lab)
                                                                        for lab in labels}


def test_range_axes_and_stable_order(tmp_path):
    from flows.spec import step_plan

    path = _write(tmp_path, [_point("s", sweep={"seed": {"range": [0, 8]}, "max_parallel": 3})])
    plan = step_plan(load_spec(path), path)
    assert [p.label for p in plan.points["s"]] == [f"seed={i}" for i in range(8)]


@pytest.mark.parametrize("steps,expected", [
    ([_point("a", needs=["b"]), _point("b", needs=["c"]), _point("c", needs=["a"])],
     "steps: dependency cycle a -> b -> c -> a"),
    ([_point("a", inputs={"x": "steps.nope.outputs"})],
     "steps.a.inputs.x: no step named 'nope'"),
    ([_point("a", needs=["ghost"])], "steps.a.needs: no step named 'ghost'"),
    ([_point("a"), _point("a")], "steps.a.name: duplicate step name 'a'"),
    ([{**_point("a"), "command": ["python", "{inputs.mesh}"]}],
     "steps.a.command[1]: placeholder {inputs.mesh} names nothing"),
    ([{**_point("a"), "command": ["echo", "{params.alpha}"]}],
     "steps.a.command[1]: placeholder {params.alpha} names nothing"),
    ([{**_point("a"), "command": ["echo", "{out"]}], "steps.a.command[1]:"),
    ([{**_point("a"), "command": ["no-such-program-xyz"]}],
     "steps.a.command[0]: 'no-such-program-xyz' is not on PATH"),
    ([{**_point("a"), "command": ["./missing.x"]}], "steps.a.command[0]: './missing.x' does not"),
    ([_point("a", launcher={"mpiexec": "/opt/nowhere/mpirun"})],
     "steps.a.launcher.mpiexec: '/opt/nowhere/mpirun' does not exist"),
    ([{"name": "k", "uses": "heat", "outputs": ["field.npy"]},
      _point("b", inputs={"x": "steps.k.outputs/counts.tsv"})],
     "steps.b.inputs.x: step 'k' declares no output matching 'counts.tsv'"),
    ([_point("a", inputs={"x": "no/such/file.txt"})],
     "steps.a.inputs.x: local path 'no/such/file.txt' does not exist"),
    ([{"name": "k", "uses": "heat", "parameters": {"nx": 8, "ny": 8},
       "sweep": {"alpha": [0.1, 0.9]}}], "steps.k.sweep[alpha=0.9]: alpha:"),
    ([_point("a", per_point=True)], "steps.a.per_point: needs an input from exactly one swept"),
])
def test_graph_mistakes_are_one_line_each(tmp_path, steps, expected):
    message = _refusal(tmp_path, steps)
    assert expected in message
    line = next(ln for ln in message.splitlines() if expected.split(":")[0] in ln)
    assert line.strip().startswith(expected.split(" ")[0])


@pytest.mark.parametrize("step,expected", [
    ({"name": "a", "command": ["x"], "uses": "heat"}, "exactly one of uses"),
    ({"name": "a"}, "exactly one of uses"),
    ({"name": "a", "command": ["x"], "launcher": "none", "ranks": 4}, "ranks must be 1"),
    ({"name": "a", "command": ["x"], "ranks": True}, "steps.0.ranks"),
    ({"name": "a", "command": ["x"], "sweep": {"alpha": ["a b"]}}, "sweep value 'a b'"),
    ({"name": "Bad Name", "command": ["x"]}, "steps.0.name"),
    ({"name": "a", "uses": "heat", "parameters": {"alpha": 0.9}}, "alpha"),
])
def test_step_fields_are_validated(tmp_path, step, expected):
    assert expected in _refusal(tmp_path, [step])


def test_srun_needs_a_slurm_backend(tmp_path):
    message = _refusal(tmp_path, [{"name": "a", "command": ["true"], "launcher": "srun"}])
    assert "steps.a.launcher: srun needs a Slurm backend, not 'local'" in message


def test_placeholders_fill_one_argument_each() -> None:
    values = {"out": "/o", "inputs.mesh": "/in/a b;$(rm -rf /)"}
    assert fill("--mesh={inputs.mesh}", values) == "--mesh=/in/a b;$(rm -rf /)"
    assert fill("{{literal}} {out}", values) == "{literal} /o"
    assert names_in("{out}/{inputs.mesh}") == ["out", "inputs.mesh"]
    for bad in ("{out!r}", "{out:>10}", "{0}", "{a.b.c}"):
        with pytest.raises(PlaceholderError):
            names_in(bad)


@pytest.mark.parametrize("steps,field", [
    ([_point("a", needs=["b"]), _point("b", needs=["a"])], "dependency cycle a -> b -> a"),
    ([_point("a", inputs={"x": "steps.nope.outputs"})], "steps.a.inputs.x"),
    ([{**_point("a"), "command": ["echo", "{params.nope}"]}], "steps.a.command[1]"),
])
def test_cli_refuses_before_anything_is_created(aws, cli_env, tmp_path, steps, field):
    storage = {"input_bucket": f"refused-{os.getpid()}-in",
               "results_bucket": f"refused-{os.getpid()}-out"}
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"name": "bad", "storage": storage, "steps": steps}))
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    proc = run_cli(["run", "--spec", str(spec)], cli_env, tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert field in proc.stderr and "Traceback" not in proc.stderr
    buckets = {b["Name"] for b in aws.client("s3").list_buckets()["Buckets"]}
    assert not buckets & set(storage.values())
    assert not (tmp_path / ".clusterflow" / "scratch").exists()  # nor a run directory


def test_human_summary_is_one_row_per_point(capsys, monkeypatch):
    from flows.cli import _steps_summary

    monkeypatch.setenv("COLUMNS", "200")
    points = [{"point": f"seed={i}", "params": {"seed": i}, "backend": "slurm",
               "job_id": f"41_{i}", "seconds": 1.25, "computed_by": "r1",
               "state": "completed" if i != 7 else "failed",
               "outputs": [{"name": "value.json", "sha256": f"{i:02x}" * 32, "bytes": 9}]
               if i != 7 else [], **({"error": "sq[seed=7]: exit code 3"} if i == 7 else {})}
              for i in range(64)]
    _steps_summary({"run_id": "r1", "state": "failed", "aws": "embedded AWS [moto]",
                    "points": {"total": 64, "failed": 1}, "seconds": {"steps": 70.0},
                    "steps": {"sq": {"points": points}}, "result_sha256": "ab" * 32,
                    "s3": {"manifest": "s3://b/runs/r1/manifest.json"}, "scratch_dir": "/s",
                    "fanout": {"queues": {}}})
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.lstrip().startswith("sq ")]
    assert len(rows) == 64
    assert "seed=7" in rows[7] and "failed" in rows[7] and "exit code 3" in rows[7]
    assert "41_3" in rows[3] and "value.json 030303030303" in rows[3]
    assert "63/64 points completed" in out and "embedded AWS [moto]" in out
