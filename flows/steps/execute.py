"""One point of one step, start to finish: inputs, command, launch, wait, outputs, publish.

A point's work directory is ``<run dir>/<step>[/<point>]``; the command runs there, writes
into ``{out}`` (``.../out``), and its stdout/stderr go to the Prefect log line by line. Every
declared output is published to ``s3://<results>/<prefix><run-id>/<step>[/<point>]/`` with its
sha256, followed by the point's ``step.json``. The record returned is what downstream steps,
``reuse_result`` and the run's manifest are built from.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from flows.backends import requeues
from flows.errors import RanksNeverStarted
from flows.joblog import failure_lines, forward
from flows.steps.graph import Plan, Point
from flows.steps.inputs import (
    InputError,
    digest,
    link_upstream,
    local_identity,
    s3_identity,
    stage_s3,
    upstream_identity,
)
from flows.steps.launch import command_argv, in_dir, job_env, wrap
from flows.steps.model import StepSpec
from infra.aws.clients import AwsTarget
from infra.backends.launchers import python_module
from infra.backends.providers.base import ExecutionProvider, JobHandle, JobState, JobStatus
from infra.backends.providers.polling import Backoff, wait
from infra.backends.providers.spot import job_interruptions
from infra.backends.srun_guard import NOT_LAUNCHED_MARK
from infra.staging.objects import IntegrityError, download, upload
from infra.staging.outputs import collect
from infra.telemetry.job import telemetry_env
from mpi_jobs.catalog import KERNELS

STEP_MANIFEST = "step.json"
# Any key ending in manifest.json under the results prefix is the run's "results ready" event,
# so a kernel's own manifest is embedded in step.json instead of being published as a file.
RUN_MANIFEST = "manifest.json"


class PointFailed(RuntimeError):
    """A point's job failed, timed out, or was cancelled; the message says which and why."""


class NotLaunched(PointFailed, RanksNeverStarted):
    """The point's ranks never started (srun's tasks failed to launch): nothing ran, so the
    point is run once more even without ``retries`` (flows.errors.retry_condition)."""


def job_failed(task_name: str, ranks: int, status: JobStatus, job: JobHandle) -> PointFailed:
    """The exception for a point whose job did not complete, with the log's last lines."""
    err = job.stderr.read_text(errors="replace") if job.stderr.is_file() else ""
    cls = NotLaunched if NOT_LAUNCHED_MARK in err else PointFailed
    tail = failure_lines(err, last=8, sep=" | ") or _tail(job.stdout)
    return cls(f"{task_name} on {ranks} rank(s) {status.state.value} ({status.message}): "
               f"{tail}")


def job_ended(provider: ExecutionProvider, point: Point, ranks: int, job: JobHandle,
              status: JobStatus, attempt: dict[str, Any], t0: float) -> None:
    """Note the attempt's seconds and Spot interruptions; PointFailed unless it completed."""
    attempt["seconds"] = round(time.perf_counter() - t0, 3)
    spot = job_interruptions(provider, job)
    if spot and spot["interruptions"]:  # requeues after a reclaim, and the compute they lost
        attempt["spot"] = spot
    if status.state is not JobState.COMPLETED:
        raise job_failed(point.task_name, ranks, status, job)


def completed_record(run: StepRun, point: Point, step: StepSpec, backend: str, ranks: int,
                     job: JobHandle, attempt: dict[str, Any], identity: dict[str, Any], *,
                     out_dir: str, files: list[dict[str, Any]], kernel_manifest: Any,
                     written_in: object = None) -> dict[str, Any]:
    """The point's ``step.json`` record, once its outputs are known; PointFailed when a
    bundled kernel left no manifest or the step's ``outputs`` globs matched nothing in
    ``written_in`` (where the command wrote; default ``out_dir``)."""
    if step.uses and not isinstance(kernel_manifest, dict):
        raise PointFailed(not_written(point.task_name, step.uses, job))
    if step.outputs and not files:
        raise PointFailed(f"{point.task_name} finished but wrote nothing matching "
                          f"{', '.join(step.outputs)} under {written_in or out_dir}")
    record = {"step": point.step, "label": point.label, "params": point.params,
              "state": "completed", "backend": backend, "job_id": job.job_id,
              "ranks": ranks, "seconds": attempt["seconds"], "computed_by": run.run_id,
              "input_sha256": digest(identity), "out_dir": out_dir,
              "s3_prefix": run.results_prefix(run.run_id, point), "files": files}
    if "spot" in attempt:
        record["spot"] = attempt["spot"]
    if isinstance(kernel_manifest, dict):
        record["kernel_manifest"] = kernel_manifest
    return record


class StepRun:
    """What every point of one pipeline run shares: plan, AWS, backends, and the records of
    points that finished (read by their downstream points)."""

    def __init__(self, *, spec: Any, plan: Plan, aws: AwsTarget, run_id: str, run_dir: Path,
                 backends: Any, logger: Any, events: Any = None, fsx: Any = None) -> None:
        self.spec, self.plan, self.aws = spec, plan, aws
        self.fsx = fsx  # flows.steps.fsx.StepsFsx: staged through the cluster's FSx
        self.run_id, self.run_dir = run_id, run_dir
        self.backends, self.logger, self.events = backends, logger, events
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.attempts: dict[tuple[str, str], dict[str, Any]] = {}
        self.cancelled: set[str] = set()  # steps whose remaining points must stop (fail_fast)
        self.arrays: dict[str, Any] = {}  # step -> ArrayBatch (Slurm job arrays)
        self._staged: dict[tuple[str, str], Path] = {}
        self._s3_ids: dict[str, Any] = {}
        # Set up once per run; {} unless CLUSTERFLOW_TELEMETRY turns it on. A user's step
        # reports with mpi_jobs.telemetry.report, the bundled kernels by themselves.
        self.telemetry = telemetry_env(aws, run_id, spec.storage.results_bucket)
        self._lock = threading.Lock()

    # ---- where things go

    def backend_of(self, step: StepSpec) -> str:
        return step.backend or self.spec.backend

    def point_dir(self, point: Point) -> Path:
        base = self.run_dir / point.step
        return base / point.label if point.label else base

    def results_prefix(self, run_id: str, point: Point) -> str:
        tail = f"{point.step}/{point.label}/" if point.label else f"{point.step}/"
        return f"{self.spec.storage.results_prefix}{run_id}/{tail}"

    # ---- inputs

    def upstream_records(self, point: Point, step_name: str) -> list[dict[str, Any]]:
        return [self.records[k] for k in point.upstream if k[0] == step_name]

    def identity(self, point: Point) -> dict[str, Any]:
        """sha256 of everything the point reads, known before it runs."""
        out: dict[str, Any] = {}
        for ref in self.plan.inputs[point.step]:
            if ref.kind == "step":
                out[ref.name] = upstream_identity(ref, self.upstream_records(point, ref.value))
            elif ref.kind == "s3":  # the same object for every point of a sweep: ask once
                with self._lock:
                    if ref.value not in self._s3_ids:
                        self._s3_ids[ref.value] = s3_identity(self.aws, ref.value)
                out[ref.name] = self._s3_ids[ref.value]
            else:
                out[ref.name] = local_identity(Path(ref.value))
        return out

    def input_paths(self, point: Point) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for ref in self.plan.inputs[point.step]:
            if ref.kind == "local":
                paths[ref.name] = Path(ref.value)
            elif ref.kind == "s3":
                with self._lock:  # every point of a step reads the same staged copy
                    key = (point.step, ref.name)
                    if key not in self._staged:
                        dest = self.run_dir / point.step / "in" / ref.name
                        self._staged[key] = stage_s3(self.aws, ref.value, dest)
                paths[ref.name] = self._staged[key]
            else:
                records = self.upstream_records(point, ref.value)
                paths[ref.name] = link_upstream(ref, records,
                                                self.point_dir(point) / "in" / ref.name,
                                                self.fan_in(point, ref))
        return paths

    def fan_in(self, point: Point, ref: Any) -> bool:
        """Whether a step input gathers several upstream points (one sub-folder each)."""
        step = self.plan.steps[point.step]
        linked = step.per_point and self.plan.per_point_of.get(step.name) == ref.value
        ups = self.plan.points[ref.value]
        return not linked and (len(ups) > 1 or any(p.label for p in ups))


def _values(run: StepRun, point: Point, step: StepSpec, out: Path, ranks: int,
            inputs: dict[str, Path]) -> dict[str, str]:
    values = {"out": str(out), "ranks": str(ranks), "spec_dir": str(run.plan.spec_dir),
              "run_id": run.run_id, "point": point.label}
    values |= {f"inputs.{k}": str(v) for k, v in inputs.items()}
    values |= {f"params.{k}": str(v) for k, v in point.params.items()}
    return values


def _kernel_argv(run: StepRun, step: StepSpec, point: Point, inputs: dict[str, Path],
                 out: Path, work: Path) -> list[str]:
    info = KERNELS[step.uses]
    params = step.kernel_parameters(point.params)
    if len(inputs) > 1:
        raise InputError(f"step {step.name!r} uses {step.uses}, which reads one input; "
                         f"it has {len(inputs)} ({', '.join(inputs)})")
    if inputs:
        (source,) = inputs.values()
    else:
        source = _generated_input(run, info, params, work)
    checkpoints = work / "checkpoints" if step.checkpoint_every else None
    # With requeue (Spot) a reclaimed job's script runs again: it must resume on its own.
    requeued = requeues(run.spec, run.backend_of(step))
    restart = checkpoints is not None and (requeued or (checkpoints.is_dir()
                                                        and any(checkpoints.iterdir())))
    return python_module(info.module, *info.argv(
        params, source, out, checkpoint_dir=checkpoints,
        checkpoint_every=step.checkpoint_every, restart=restart))


def _generated_input(run: StepRun, info: Any, params: Any, work: Path) -> Path:
    """The kernel's deterministic sample input, uploaded once and staged like any input."""
    from infra.staging.objects import exists

    bucket = run.spec.storage.input_bucket
    key = run.spec.storage.input_prefix + info.input_key(params)
    with run._lock:
        if not exists(run.aws, bucket, key):
            generated = work / f"generated-{Path(key).name}"
            info.make_input(params, generated)
            upload(run.aws, generated, bucket, key)
            generated.unlink()
    return download(run.aws, bucket, key, work / "in" / Path(key).name).path


def _tail(path: Path) -> str:
    return failure_lines(path.read_text(errors="replace"), last=8, sep=" | ")


def link_inputs_into(out: Path, inputs: dict[str, Path]) -> None:
    """Each file input also appears in the command's working directory under its own name,
    for programs that read a fixed file name from where they run (``hpccinf.txt``)."""
    for path in inputs.values():
        link = out / path.name
        if path.is_file() and not link.exists() and not link.is_symlink():
            link.symlink_to(path)


def collect_outputs(step: StepSpec, out: Path) -> list[dict[str, Any]]:
    """Every regular file under ``out`` the step's globs (default: all) name, with sha256
    (``infra.staging.outputs``: the same choice the job makes on a cluster's FSx)."""
    return collect(out, step.outputs or (), skip=(STEP_MANIFEST, RUN_MANIFEST))


def publish_record(run: StepRun, point: Point, out: Path, record: dict[str, Any]) -> None:
    """The point's ``step.json`` (files, sha256s, job, timings), after its outputs."""
    bucket = run.spec.storage.results_bucket
    prefix = run.results_prefix(run.run_id, point)
    body = {k: v for k, v in record.items() if k != "out_dir"}
    out.mkdir(parents=True, exist_ok=True)
    (out / STEP_MANIFEST).write_text(json.dumps(body, indent=2) + "\n")
    upload(run.aws, out / STEP_MANIFEST, bucket, prefix + STEP_MANIFEST)


def publish_point(run: StepRun, point: Point, out: Path, record: dict[str, Any]) -> None:
    """Outputs to S3 under this run, then ``step.json``."""
    bucket = run.spec.storage.results_bucket
    prefix = run.results_prefix(run.run_id, point)
    for f in record["files"]:
        upload(run.aws, out / f["name"], bucket, prefix + f["name"])
    publish_record(run, point, out, record)


def execute_point(run: StepRun, point: Point, identity: dict[str, Any]) -> dict[str, Any]:
    """Run one point and publish its outputs; PointFailed on any failure."""
    if run.fsx is not None:  # staged through the cluster's FSx (flows.steps.fsx)
        return run.fsx.execute_point(run, point, identity)
    step = run.plan.steps[point.step]
    backend = run.backend_of(step)
    work = run.point_dir(point)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    ranks = run.plan.ranks(step, run.spec.ranks)
    attempt = run.attempts.setdefault(point.key, {"backend": backend})
    t0 = time.perf_counter()
    try:
        inputs = run.input_paths(point)
        values = _values(run, point, step, out, ranks, inputs)
        if step.uses:
            argv = _kernel_argv(run, step, point, inputs, out, work)
        else:  # a command runs in {out}, its file inputs linked there by name (as Nextflow)
            link_inputs_into(out, inputs)
            argv = in_dir(out, command_argv(step, values, run.plan.spec_dir))
        provider = run.backends.get(backend)
        command = wrap(step, provider, backend, ranks, argv)
        env = {**job_env(step, values), **run.telemetry}
        run.logger.info("%s on %s (%d rank%s): %s", point.task_name, backend, ranks,
                        "s" * (ranks != 1), " ".join(command))
        job = _submit(run, provider, step, point, command, ranks, work, env)
        attempt["job_id"] = job.job_id
        status = _wait(run, provider, step, point, job)
    except (InputError, IntegrityError, OSError) as e:
        attempt["seconds"] = round(time.perf_counter() - t0, 3)
        raise PointFailed(f"{point.task_name}: {e}") from None
    job_ended(provider, point, ranks, job, status, attempt, t0)
    own = out / RUN_MANIFEST
    kernel_manifest = None
    if own.is_file():
        try:
            kernel_manifest = json.loads(own.read_text())
        except ValueError:
            pass  # a command's own file of that name: kept on scratch, not published
    record = completed_record(run, point, step, backend, ranks, job, attempt, identity,
                              out_dir=str(out), files=collect_outputs(step, out),
                              kernel_manifest=kernel_manifest)
    publish_point(run, point, out, record)
    return record


def not_written(task_name: str, kernel: str, job: JobHandle) -> str:
    """Why a job that "completed" without its kernel's manifest is a failure: every bundled
    kernel writes one as its last act, so its ranks did not all run to the end (a launcher
    that exits 0 when its tasks never started, a rank killed after the others finished)."""
    return (f"{task_name}: the job ended with exit code 0 but {kernel} wrote no "
            f"{RUN_MANIFEST}, so its ranks did not run to the end: "
            f"{_tail(job.stderr) or _tail(job.stdout) or 'nothing on stderr or stdout'}")


def _submit(run: StepRun, provider: ExecutionProvider, step: StepSpec, point: Point,
            command: list[str], ranks: int, work: Path, env: dict[str, str]) -> JobHandle:
    batch = run.arrays.get(step.name)
    if batch is not None:
        handle = batch.register(point, command, work, env)
        if handle is not None:
            return handle
    job_name = point.step if not point.label else f"{point.step}-{point.index}"
    if run.backend_of(step) == "parallelcluster":
        # Its scripts and logs go in <remote_root>/<workdir name>/: the run's folder, where
        # every point's job name is its own (a point's folder name may hold '=' and ',').
        work = run.run_dir
    return provider.submit(command, ranks=ranks, job_name=job_name, workdir=work, env=env)


def _wait(run: StepRun, provider: ExecutionProvider, step: StepSpec, point: Point,
          job: JobHandle) -> JobStatus:
    offsets = {job.stdout: 0, job.stderr: 0}
    prefix = f"[{point.task_name}]"

    def on_poll(_: JobStatus) -> None:
        for path in offsets:
            offsets[path] = forward(path, offsets[path], prefix, run.logger)
        if step.name in run.cancelled:
            raise PointFailed(f"{point.task_name} cancelled: a sibling point failed "
                              "(fail_fast)")

    backoff = Backoff(first=0.1, cap=0.1) if run.backend_of(step) == "local" else Backoff()
    try:
        return wait(provider, job, on_poll=on_poll, backoff=backoff, timeout=step.timeout)
    except TimeoutError:
        provider.cancel(job)
        raise PointFailed(f"{point.task_name} ran past its timeout of {step.timeout} s and "
                          "was cancelled") from None
    except BaseException:
        provider.cancel(job)  # a cancelled flow or sibling must not leave ranks running
        raise


def reuse_point(run: StepRun, point: Point, earlier: dict[str, Any]) -> dict[str, Any]:
    """An earlier run's outputs for the same point, verified, in this run's out dir and
    published under this run (``computed_by`` keeps naming the run that computed them)."""
    if run.fsx is not None:
        return run.fsx.reuse_point(run, point, earlier)
    out = run.point_dir(point) / "out"
    bucket = run.spec.storage.results_bucket
    for f in earlier["files"]:
        got = download(run.aws, bucket, earlier["s3_prefix"] + f["name"], out / f["name"])
        if got.sha256 != f["sha256"]:
            got.path.unlink()
            raise IntegrityError(f"{got.uri}: sha256 {got.sha256} is not the recorded "
                                 f"{f['sha256']}")
    record = {**earlier, "out_dir": str(out), "state": "reused",
              "s3_prefix": run.results_prefix(run.run_id, point)}
    publish_point(run, point, out, record)
    return record
