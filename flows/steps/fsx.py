"""A ``steps:`` run on ParallelCluster staged through the cluster's FSx for Lustre.

clusterflow runs anywhere; only the ranks see the file system (``flows.fsx_staging`` does the
same for the single-kernel pipeline, and this reuses its stages). Before the first step:

- every input the run reads reaches the file system through its S3 link, in as few import
  tasks as the links allow (auto-import: a wait until visible; a SCRATCH ``ImportPath``: the
  lazy load): the steps' ``s3://`` inputs (a prefix: each object under it), a kernel step's
  generated sample (uploaded once, as on every backend), and a local file or folder the spec
  names, uploaded content-addressed to ``<input_prefix>clusterflow-local/<sha256>/`` first
  (so a script that ships with the spec reaches the cluster as ``{inputs.NAME}``).

Each point then runs as a Slurm job in ``<remote_root>/<run id>/<step>[/<point>]/`` with
``{out}`` its ``out/``, wrapped by ``infra.staging.fsx_job --step``: it makes the links the
point reads its upstream outputs and file inputs through, runs the command, and moves the
outputs (the step's globs) into the exported directory of that point (under the association
that exports to ``<results prefix><run id>/<step>[/<point>]/``) with their sums. The point's
export task (batched with siblings finishing at the same time, ``infra.staging.fsx_tasks``)
follows, every output is verified in S3 by sha256, and only then is the point's ``step.json``
uploaded; downstream points read the outputs where the export left them on the file system.
The run's ``manifest.json`` (the "results ready" event) lists only verified points.

With ``reuse_result`` a reused point's earlier outputs are copied server side (S3 computes
the SHA-256 and it is compared) to this run's prefix and, if a later step reads them,
imported back onto the file system where the point would have written them.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from flows.fsx_staging import (
    FsxRun,
    _copy_verified,
    export_verified,
    open_staging,
    plan_run,
    stage_keys_in,
)
from flows.steps.execute import (
    PointFailed,
    StepRun,
    _submit,
    _values,
    _wait,
    completed_record,
    job_ended,
    publish_record,
)
from flows.steps.graph import Plan, Point
from flows.steps.inputs import InputError, local_identity, split_s3, upstream_links
from flows.steps.launch import command_argv, in_dir, job_env, wrap
from infra.aws.clients import AwsTarget
from infra.backends.launchers import python_module
from infra.staging.fsx import FsxError
from infra.staging.fsx_run import FsxRunStaging, VerifyError
from infra.staging.objects import IntegrityError, exists, upload
from mpi_jobs.catalog import KERNELS

if TYPE_CHECKING:
    from flows.spec import PipelineSpec

LOCAL_INPUTS = "clusterflow-local/"  # under the spec's input_prefix


def local_input_key(spec: PipelineSpec, path: Path) -> str:
    """Where a local input goes in S3: content-addressed, so an unchanged file is sent once."""
    tag = hashlib.sha256(repr(local_identity(path)).encode()).hexdigest()[:16]
    return f"{spec.storage.input_prefix}{LOCAL_INPUTS}{tag}/{path.name}"


def generated_key(spec: PipelineSpec, step: Any, point: Point) -> str:
    info = KERNELS[step.uses]
    return spec.storage.input_prefix + info.input_key(step.kernel_parameters(point.params))


@dataclass
class StepsFsx:
    """One staged steps run: its places on the file system and in S3, and its staging."""

    spec: PipelineSpec
    plan: Plan
    aws: AwsTarget
    run: FsxRun
    staging: FsxRunStaging
    logger: Any
    paths: dict[str, str] = field(default_factory=dict)  # input -> its mounted path

    @classmethod
    def open(cls, spec: PipelineSpec, plan: Plan, aws: AwsTarget, run_id: str, run_dir: Path,
             provider: Any, logger: Any, fsx_client: Any = None) -> StepsFsx:
        run = plan_run(spec, run_id, run_dir)
        staging = open_staging(spec, aws, run, provider, run_id, logger, fsx_client)
        return cls(spec, plan, aws, run, staging, logger)

    # ---------------------------------------------------------------- places

    def point_dir(self, point: Point) -> PurePosixPath:
        base = PurePosixPath(self.run.remote_dir) / point.step
        return base / point.label if point.label else base

    def export_fs(self, point: Point) -> str:
        tail = f"{point.step}/{point.label}" if point.label else point.step
        return f"{self.run.export_fs}/{tail}"

    # ---------------------------------------------------------------- inputs, before any step

    def stage_inputs(self, run_dir: Path) -> int:
        """Every input of every step onto the file system; returns how many objects."""
        s3 = self.aws.client("s3")
        wanted: dict[str, dict[str, str]] = {}  # bucket -> key -> what it stands for
        dirs: dict[str, tuple[str, str]] = {}  # a folder input -> (bucket, prefix)
        bucket_in = self.spec.storage.input_bucket
        for name, step in self.plan.steps.items():
            refs = self.plan.inputs[name]
            for ref in refs:
                if ref.kind == "s3":
                    bucket, key = split_s3(ref.value)
                    if ref.is_file:
                        wanted.setdefault(bucket, {})[key] = ref.value
                        continue
                    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
                        Bucket=bucket, Prefix=key) for o in page.get("Contents", [])]
                    if not keys:
                        raise InputError(f"steps.{name}.inputs.{ref.name}: {ref.value} holds "
                                         "no objects")
                    for k in keys:
                        wanted.setdefault(bucket, {}).setdefault(k, "")
                    dirs[ref.value] = (bucket, key)
                elif ref.kind == "local":
                    self._upload_local(Path(ref.value), wanted.setdefault(bucket_in, {}),
                                       dirs)
            if step.uses and not refs:  # the kernel's generated sample, per point
                for point in self.plan.points[name]:
                    key = generated_key(self.spec, step, point)
                    if key not in wanted.get(bucket_in, {}):
                        self._ensure_generated(step, point, key, run_dir)
                        wanted.setdefault(bucket_in, {})[key] = key
        total = 0
        for bucket, keys in wanted.items():
            mounted = stage_keys_in(self.staging, self.run.layout, bucket, list(keys),
                                    self.logger)
            for key, path in zip(keys, mounted, strict=True):
                if keys[key]:
                    self.paths[keys[key]] = path
            total += len(keys)
        for what, (bucket, prefix) in dirs.items():
            link = self.run.layout.input_link(bucket, prefix)
            assert link is not None  # checked when the spec was loaded
            self.paths[what] = link.mounted(link.fs_path(bucket, prefix) or "").rstrip("/")
        return total

    def _upload_local(self, path: Path, wanted: dict[str, str],
                      dirs: dict[str, tuple[str, str]]) -> None:
        bucket, key = self.spec.storage.input_bucket, local_input_key(self.spec, path)
        files = [(path, key)] if path.is_file() else [
            (p, f"{key}/{p.relative_to(path).as_posix()}")
            for p in sorted(path.rglob("*")) if p.is_file()]
        for p, k in files:
            if not exists(self.aws, bucket, k):
                upload(self.aws, p, bucket, k)
        if path.is_file():
            wanted[key] = str(path)
        else:
            for _, k in files:
                wanted.setdefault(k, "")
            dirs[str(path)] = (bucket, key + "/")
        self.logger.info("local input %s is in s3://%s/%s for the cluster", path, bucket, key)

    def _ensure_generated(self, step: Any, point: Point, key: str, run_dir: Path) -> None:
        bucket = self.spec.storage.input_bucket
        if exists(self.aws, bucket, key):
            return
        info = KERNELS[step.uses]
        generated = run_dir / f"generated-{Path(key).name}"
        generated.parent.mkdir(parents=True, exist_ok=True)
        info.make_input(step.kernel_parameters(point.params), generated)
        upload(self.aws, generated, bucket, key)
        generated.unlink()

    # ---------------------------------------------------------------- one point

    def execute_point(self, run: StepRun, point: Point, identity: dict[str, Any],
                      ) -> dict[str, Any]:
        return execute_point_fsx(run, self, point, identity)

    def reuse_point(self, run: StepRun, point: Point, earlier: dict[str, Any],
                    ) -> dict[str, Any]:
        return reuse_point_fsx(run, self, point, earlier)

    def input_paths(self, run: StepRun, point: Point, work: PurePosixPath,
                    ) -> tuple[dict[str, PurePosixPath], set[str], list[tuple[str, str]]]:
        """The mounted path of each input, which of them are files, and the links the job
        makes for upstream outputs (the same choice as on a shared scratch)."""
        paths: dict[str, PurePosixPath] = {}
        files: set[str] = set()
        links: list[tuple[str, str]] = []
        for ref in self.plan.inputs[point.step]:
            if ref.kind in ("s3", "local"):
                paths[ref.name] = PurePosixPath(self.paths[ref.value])
                if ref.is_file:
                    files.add(ref.name)
                continue
            fan_in = run.fan_in(point, ref)
            path, made = upstream_links(ref, run.upstream_records(point, ref.value),
                                        work / "in" / ref.name, fan_in)
            paths[ref.name] = PurePosixPath(path)
            if not made and ref.is_file and not fan_in:
                files.add(ref.name)
            links += [(str(a), str(b)) for a, b in made]
        return paths, files, links

    def kernel_source(self, step: Any, point: Point, inputs: dict[str, PurePosixPath]) -> str:
        if len(inputs) > 1:
            raise InputError(f"step {step.name!r} uses {step.uses}, which reads one input; "
                             f"it has {len(inputs)} ({', '.join(inputs)})")
        if inputs:
            return str(next(iter(inputs.values())))
        return self.paths[generated_key(self.spec, step, point)]

    def hand_over(self, provider: Any, step: Any, point: Point, out: PurePosixPath,
                  links: list[tuple[str, str]], command: list[str]) -> list[str]:
        """``command`` inside the job-side hand-over to the point's export directory."""
        globs = [a for g in step.outputs for a in ("--glob", g)]
        made = [a for pair in links for a in ("--link", *pair)]
        return [provider.python, "-m", "infra.staging.fsx_job", "--step", "--out", str(out),
                "--export", self.run.layout.mounted(self.export_fs(point)), *globs, *made,
                "--", *command]

    def publish(self, run: StepRun, point: Point) -> tuple[list[dict[str, Any]], Any, str]:
        """Export the point's directory, verify in S3; (files, kernel manifest, mounted dir)."""
        try:
            record, _, _ = export_verified(self.spec, self.aws, self.staging, self.run,
                                           self.export_fs(point),
                                           run.results_prefix(run.run_id, point))
        except (FsxError, VerifyError) as e:
            raise PointFailed(f"{point.task_name}: {e}") from None
        return (record["files"], record.get("kernel_manifest"),
                self.run.layout.mounted(self.export_fs(point)))

    def reuse(self, run: StepRun, point: Point, earlier: dict[str, Any]) -> str:
        """The earlier outputs under this run's prefix (server-side copies, S3's SHA-256
        compared) and, if a later step reads them, on the file system where this point would
        have written them; returns that mounted directory."""
        bucket = self.spec.storage.results_bucket
        prefix = run.results_prefix(run.run_id, point)
        keys = []
        for f in earlier["files"]:
            src, dest = (bucket, earlier["s3_prefix"] + f["name"]), (bucket, prefix + f["name"])
            try:
                _copy_verified(self.aws, src, dest, f["sha256"])
            except VerifyError as e:
                raise IntegrityError(str(e)) from None
            keys.append(dest[1])
        read_later = any(ref.kind == "step" and ref.value == point.step
                         for refs in self.plan.inputs.values() for ref in refs)
        if read_later and keys:
            stage_keys_in(self.staging, self.run.layout, bucket, keys, self.logger)
        return self.run.layout.mounted(self.export_fs(point))


def execute_point_fsx(run: StepRun, fsx: StepsFsx, point: Point,
                      identity: dict[str, Any]) -> dict[str, Any]:
    """``flows.steps.execute.execute_point`` for a run staged through FSx: the point's
    folders are on the cluster's file system, its outputs leave through the export."""
    step = run.plan.steps[point.step]
    backend = run.backend_of(step)
    run.point_dir(point).mkdir(parents=True, exist_ok=True)  # this machine: the job's log
    work = fsx.point_dir(point)
    out = work / "out"
    ranks = run.plan.ranks(step, run.spec.ranks)
    attempt = run.attempts.setdefault(point.key, {"backend": backend})
    t0 = time.perf_counter()
    try:
        inputs, file_inputs, links = fsx.input_paths(run, point, work)
        values = _values(run, point, step, Path(out), ranks,
                         {k: Path(v) for k, v in inputs.items()})
        if step.uses:
            info = KERNELS[step.uses]
            checkpoints = work / "checkpoints" if step.checkpoint_every else None
            # Nothing here sees the checkpoints: --restart resumes from one if there is one.
            argv = python_module(info.module, *info.argv(
                step.kernel_parameters(point.params),
                Path(fsx.kernel_source(step, point, inputs)), Path(out),
                checkpoint_dir=Path(checkpoints) if checkpoints else None,
                checkpoint_every=step.checkpoint_every, restart=checkpoints is not None))
        else:  # in {out}, its file inputs linked there by name, as on a shared scratch
            links += [(str(out / inputs[n].name), str(inputs[n])) for n in sorted(file_inputs)]
            argv = in_dir(Path(out), command_argv(step, values, run.plan.spec_dir))
        provider = run.backends.get(backend)
        command = fsx.hand_over(provider, step, point, out, links,
                                wrap(step, provider, backend, ranks, argv))
        # This machine's PATH and PYTHONPATH mean nothing on the cluster (the job puts its
        # own interpreter's folder first); a step's own env: values still apply.
        env = {k: v for k, v in job_env(step, values).items()
               if k not in ("PATH", "PYTHONPATH") or k in step.env}
        env |= run.telemetry
        run.logger.info("%s on %s (%d rank%s) through FSx: %s", point.task_name, backend,
                        ranks, "s" * (ranks != 1), " ".join(command))
        job = _submit(run, provider, step, point, command, ranks, run.point_dir(point), env)
        attempt["job_id"] = job.job_id
        status = _wait(run, provider, step, point, job)
    except (InputError, IntegrityError, OSError) as e:
        attempt["seconds"] = round(time.perf_counter() - t0, 3)
        raise PointFailed(f"{point.task_name}: {e}") from None
    job_ended(provider, point, ranks, job, status, attempt, t0)
    files, kernel_manifest, exported = fsx.publish(run, point)
    record = completed_record(run, point, step, backend, ranks, job, attempt, identity,
                              out_dir=exported, files=files, kernel_manifest=kernel_manifest,
                              written_in=out)
    publish_record(run, point, run.point_dir(point) / "out", record)
    return record


def reuse_point_fsx(run: StepRun, fsx: StepsFsx, point: Point,
                    earlier: dict[str, Any]) -> dict[str, Any]:
    """``flows.steps.execute.reuse_point`` through FSx (see :meth:`StepsFsx.reuse`)."""
    exported = fsx.reuse(run, point, earlier)
    record = {**earlier, "out_dir": exported, "state": "reused",
              "s3_prefix": run.results_prefix(run.run_id, point)}
    publish_record(run, point, run.point_dir(point) / "out", record)
    return record

