"""flows.prefect_flow: the pipeline's parameters are stored as Prefect would store them,
without importing FastAPI for it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fastapi.encoders import jsonable_encoder
from prefect import Flow

from flows.prefect_flow import JsonParamsFlow, flow

REPO = Path(__file__).resolve().parents[2]


def _fn(spec_path: str | None = None, ranks: int | None = None, extra: object = None) -> None:
    return None


def test_the_pipeline_is_a_json_params_flow_with_its_options():
    from flows.pipeline import hpc_pipeline

    assert isinstance(hpc_pipeline, JsonParamsFlow)
    assert hpc_pipeline.name == "hpc-pipeline"
    assert hpc_pipeline.log_prints is True
    assert hpc_pipeline.task_runner._max_workers == 256  # noqa: SLF001


def test_serialized_parameters_equal_prefects_own():
    ours, theirs = flow(name="x")(_fn), Flow(fn=_fn, name="x")
    cases = [
        {"spec_path": "a.yaml", "ranks": 4, "extra": None},
        {"spec_path": None, "ranks": None, "extra": {"a": [1, 2.5, True, None, "s"]}},
        {"spec_path": "a.yaml", "ranks": 2, "extra": Path("/tmp/x")},  # not JSON: Prefect's
        {"spec_path": "a", "ranks": 1, "extra": {1: "int key"}},  # not JSON: Prefect's
    ]
    for params in cases:
        assert ours.serialize_parameters(params) == theirs.serialize_parameters(params)
        assert ours.serialize_parameters(params) == {k: jsonable_encoder(v)
                                                     for k, v in params.items()}


def test_serializing_the_pipelines_parameters_does_not_import_fastapi():
    probe = ("import sys; from flows.pipeline import hpc_pipeline; "
             "p = hpc_pipeline.serialize_parameters({'spec_path': 's.yaml', 'ranks': 2, "
             "'aws_mode': None, 'run_id': None, 'input_key': None, 'backend': 'local'}); "
             "assert p['ranks'] == 2, p; print('fastapi' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
