"""The step machinery for your own Prefect flows: ``mpi_step`` and ``session``.

::

    from prefect import flow
    from clusterflow import mpi_step, session

    @flow
    def my_pipeline():
        with session(results="s3://my-results/runs/", backend="local") as s:
            mesh = mpi_step(s, "mesh", ["python", "make_mesh.py", "{out}"], launcher="none")
            run = mpi_step(s, "solve", ["./solver.x", "{inputs.mesh}", "{out}"], ranks=4,
                           inputs={"mesh": mesh})
        return run["outputs"]

A session opens the AWS endpoint and each backend once for all its steps (a ParallelCluster
cluster or Batch environment is created once and torn down when the session ends); every
step stages its inputs, runs on N ranks, and publishes its outputs with their sha256 under
``<results>/<session run id>/<step>/``, exactly as a ``steps:`` spec does.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.backends import BackendSession
from flows.spec import PipelineSpec, SlurmOptions, Storage
from flows.steps.execute import StepRun, execute_point
from flows.steps.graph import InputRef, Plan, Point, parse_input
from flows.steps.model import StepSpec
from infra.aws.embedded import aws_target


class Session:
    """One open endpoint and set of backends, shared by several ``mpi_step`` calls."""

    def __init__(self, run: StepRun) -> None:
        self.run = run

    @property
    def run_id(self) -> str:
        return self.run.run_id


@contextlib.contextmanager
def session(results: str, *, backend: str = "local", ranks: int = 2,
            aws: str = "embedded", region: str = "us-east-1",
            scratch_dir: str | Path = ".clusterflow/scratch", name: str = "api",
            slurm: dict[str, Any] | None = None, logger: Any = None) -> Iterator[Session]:
    """Open an endpoint and backends for a group of steps; close (tear down) at the end.

    ``results`` is ``s3://bucket/prefix/``; the bucket must exist (the pipeline's provision
    or ``clusterflow events apply`` creates it) and also serves generated kernel inputs.
    """
    if not results.startswith("s3://"):
        raise ValueError(f"results must be s3://bucket/prefix/, got {results!r}")
    bucket, _, prefix = results[5:].partition("/")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    spec = PipelineSpec(name=name, backend=backend, ranks=ranks, aws=aws, region=region,
                        scratch_dir=Path(scratch_dir),
                        storage=Storage(input_bucket=bucket, results_bucket=bucket,
                                        input_prefix=prefix + "inputs/", results_prefix=prefix),
                        slurm=SlurmOptions(**(slurm or {})))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"{name}-{stamp}-{uuid.uuid4().hex[:6]}"
    log = logger or _logger()
    with aws_target(spec.aws, spec.region) as target, \
            BackendSession(spec, target, log) as backends:
        plan = Plan(steps={}, inputs={}, upstream_steps={}, points={}, spec_dir=Path.cwd())
        yield Session(StepRun(spec=spec, plan=plan, aws=target, run_id=run_id,
                              run_dir=(spec.scratch_dir / run_id).resolve(),
                              backends=backends, logger=log))


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow run: Python logging
        import logging

        return logging.getLogger("clusterflow")


@task(name="mpi_step", cache_policy=NO_CACHE)
def mpi_step(s: Session, name: str, command: list[str] | None = None, *,
             uses: str | None = None, parameters: dict[str, Any] | None = None,
             ranks: int | None = None, inputs: dict[str, Any] | None = None,
             outputs: list[str] | None = None, env: dict[str, str] | None = None,
             launcher: Any = None, backend: str | None = None,
             timeout: int | None = None) -> dict[str, Any]:
    """Run one command (or bundled kernel) on ``ranks`` ranks and publish its outputs.

    ``inputs`` values are ``s3://`` URIs, local paths, or the result of an earlier
    ``mpi_step`` in the same session (its outputs, handed over on scratch). Returns the
    outputs' names, sha256s and S3 URIs, the job id and the output directory.
    """
    run = s.run
    upstream: list[tuple[str, str]] = []
    refs: list[InputRef] = []
    for key, value in (inputs or {}).items():
        if isinstance(value, dict) and "step" in value:
            refs.append(InputRef(key, "step", value["step"]))
            upstream.append((value["step"], ""))
        else:
            refs.append(parse_input(key, str(value), Path.cwd()))
    step = StepSpec(name=name, command=command, uses=uses, parameters=parameters or {},
                    ranks=ranks, inputs={r.name: r.value for r in refs if r.kind != "step"},
                    outputs=outputs or [], env=env or {}, launcher=launcher, backend=backend,
                    timeout=timeout)
    if name in run.plan.steps:
        raise ValueError(f"step name {name!r} is already used in this session")
    run.plan.steps[name] = step
    run.plan.inputs[name] = refs
    run.plan.upstream_steps[name] = [u for u, _ in upstream]
    point = Point(step=name, index=0, label="", params=dict(parameters or {}),
                  upstream=tuple(upstream))
    run.plan.points[name] = [point]
    record = execute_point(run, point, run.identity(point))
    run.records[point.key] = record
    bucket = run.spec.storage.results_bucket
    return {"step": name, "job_id": record["job_id"], "out_dir": record["out_dir"],
            "outputs": [{"name": f["name"], "sha256": f["sha256"], "bytes": f["bytes"],
                         "s3": f"s3://{bucket}/{record['s3_prefix']}{f['name']}"}
                        for f in record["files"]]}
