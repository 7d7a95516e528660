"""The single-kernel pipeline on ParallelCluster, staged through the cluster's FSx for Lustre.

clusterflow runs anywhere; only the ranks see the file system. The order is what makes the
published manifest trustworthy:

1. the input is made sure of in S3 (the generated sample is uploaded once), then the cluster
   is opened and the input reaches the file system through its S3 link: an import task on the
   run's path, or, with auto-import, a wait until the file is visible on the head node (a
   SCRATCH file system's ``ImportPath`` loads it lazily on first read; the log says so);
2. the ranks run with paths under the cluster's mount and write into the run directory;
   ``infra.staging.fsx_job`` (in the same batch script) then moves the results into the
   exported directory and writes the sums of their bytes as they lie on Lustre;
3. an ``EXPORT_TO_REPOSITORY`` task scoped to that directory; its failure report is named in
   a one-line error. The sums file is read back from S3 and every result is verified there by
   sha256; only then is ``manifest.json`` uploaded, whose arrival is the "results ready"
   event. With a SCRATCH ``ExportPath`` the results are first copied (server side, verified)
   from there to the run's results prefix.

With ``reuse_result`` an earlier result under the same key (``flows.result_cache``: kernel,
parameters, input bytes) is copied in S3 to this run's prefix (server side, S3's SHA-256
compared with the manifest): no cluster, no file system, no job.

Nothing here reads the cluster's disk from this machine: the manifest comes back through S3,
the job's output through the provider's log mirror.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from flows.errors import MpiJobFailed
from flows.fsx_checks import raw_config
from flows.joblog import failure_lines, forward
from flows.run_inputs import grid_for_shape, input_key
from infra.aws.clients import AwsTarget
from infra.backends.launchers import python_module
from infra.backends.providers.base import JobState, JobStatus
from infra.backends.providers.polling import Backoff, wait
from infra.backends.remote_shell import run_checked
from infra.clusters.parallelcluster_validate import config_region
from infra.staging.fsx import Fsx, FsxError
from infra.staging.fsx_job import SUMS
from infra.staging.fsx_layout import FsxLayout, fsx_layout
from infra.staging.fsx_run import FsxRunStaging, VerifyError
from infra.staging.objects import IntegrityError, Transferred, object_sha256, upload
from infra.telemetry.job import telemetry_env

if TYPE_CHECKING:
    from flows.spec import PipelineSpec

MANIFEST = "manifest.json"
Timed = Callable[..., Any]  # timed(name, fn, *args) -> fn(*args), timed


# ---------------------------------------------------------------- the cluster's file system


def file_system_id(aws: AwsTarget, cluster_name: str, layout: FsxLayout) -> str:
    """The id of the config's FSx: given in the config, or the one ParallelCluster created
    (tagged with the cluster's name and the storage's ``Name``)."""
    if layout.file_system_id:
        return layout.file_system_id
    found = []
    for page in aws.client("fsx").get_paginator("describe_file_systems").paginate():
        for fs in page["FileSystems"]:
            tags = {t["Key"]: t["Value"] for t in fs.get("Tags", [])}
            mine = cluster_name in (tags.get("parallelcluster:cluster-name"),
                                    tags.get("aws:cloudformation:stack-name"))
            if mine and tags.get("Name", layout.storage_name) == layout.storage_name:
                found.append(fs["FileSystemId"])
    if len(found) != 1:
        raise FsxError(f"{'no' if not found else len(found)} FSx file system(s) tagged for "
                       f"cluster '{cluster_name}' and storage '{layout.storage_name}': is the "
                       "cluster created (CREATE_COMPLETE) in this region?")
    return found[0]


def visible_on(shell: Any) -> Callable[[list[str]], list[str]]:
    """Which of the mounted paths exist, asked of the head node (only it sees the mount)."""
    def look(paths: list[str]) -> list[str]:
        script = "\n".join(f"test -e {shlex.quote(p)} && echo {shlex.quote(p)} || true"
                           for p in paths)
        out = run_checked(shell, script, what="FSx visibility check").stdout
        return [ln.strip() for ln in out.splitlines() if ln.strip()]
    return look


@dataclass(frozen=True)
class FsxRun:
    """One run's places: on the file system (``fs``: relative to it; ``mounted``: as the
    ranks see them) and in S3."""

    layout: FsxLayout
    remote_dir: str  # the run directory, mounted path
    export_fs: str  # the exported results directory, file-system path
    copy_to_results: bool  # a SCRATCH ExportPath: copy to the results prefix afterwards
    results_prefix: str  # runs/<run id>/


def plan_run(spec: PipelineSpec, run_id: str, run_dir: Path) -> FsxRun:
    layout = fsx_layout(raw_config(spec))
    if layout is None:  # refused at load; the config changed since
        raise FsxError(f"{spec.parallelcluster.config} has no FSx for Lustre linked to S3")
    prefix = f"{spec.storage.results_prefix}{run_id}/"
    root = spec.parallelcluster.remote_root.rstrip("/")
    export_fs, copy = layout.results_dir(spec.storage.results_bucket, prefix, root)
    return FsxRun(layout, f"{root}/{run_dir.name}", export_fs, copy, prefix)


# ---------------------------------------------------------------- the three stages


def ensure_input(spec: PipelineSpec, aws: AwsTarget, run_dir: Path, logger: Any) -> Transferred:
    """The kernel's input in S3 (the generated sample uploaded once); nothing is downloaded."""
    info, bucket, key = spec.kernel_info, spec.storage.input_bucket, input_key(spec)
    s3 = aws.client("s3")
    try:
        head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except s3.exceptions.ClientError as e:
        if spec.kernel.input_key is not None or e.response["Error"]["Code"] not in (
                "404", "NoSuchKey", "NotFound"):
            raise
        run_dir.mkdir(parents=True, exist_ok=True)
        generated = run_dir / f"generated-{Path(key).name}"
        info.make_input(spec.kernel.parameters, generated)
        sent = upload(aws, generated, bucket, key)
        generated.unlink()
        logger.info("generated the %s input and uploaded it to %s", info.name, sent.uri)
        return sent
    sha = object_sha256(aws, bucket, key) or head.get("Metadata", {}).get("sha256")
    if not sha:
        raise IntegrityError(f"s3://{bucket}/{key} carries no SHA-256 (neither an S3 checksum "
                             "nor sha256 metadata); re-upload it with clusterflow")
    return Transferred(f"s3://{bucket}/{key}", Path(key), head["ContentLength"], sha)


def npy_shape(aws: AwsTarget, bucket: str, key: str) -> tuple[int, ...]:
    """An uploaded ``.npy``'s shape from its header (one ranged GET, not the array)."""
    import io

    import numpy as np

    head = aws.client("s3").get_object(Bucket=bucket, Key=key, Range="bytes=0-65535")
    f = io.BytesIO(head["Body"].read())
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version} is not supported here")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape = read(f)[0]
    except ValueError as e:
        raise IntegrityError(f"the heat input s3://{bucket}/{key} is not a .npy array: {e}"
                             ) from None
    return tuple(int(n) for n in shape)


def stage_in_fsx(staging: FsxRunStaging, run: FsxRun, src: Transferred, logger: Any) -> str:
    """The input onto the file system; returns its path under the cluster's mount."""
    bucket, _, key = src.uri[len("s3://"):].partition("/")
    (mounted,) = stage_keys_in(staging, run.layout, bucket, [key], logger)
    return mounted


def stage_keys_in(staging: FsxRunStaging, layout: FsxLayout, bucket: str, keys: list[str],
                  logger: Any) -> list[str]:
    """Objects of ``bucket`` onto the file system (an import task, an auto-import wait, or a
    SCRATCH lazy load, as their link says); returns their paths under the cluster's mount."""
    links = {layout.input_link(bucket, k) for k in keys}
    for link in links - {None}:
        if link.lazy:
            logger.info("inputs under %s are listed from the SCRATCH file system's "
                        "ImportPath: each loads lazily on the ranks' first read (no import "
                        "task)", link.repository)
        elif "NEW" in link.auto_import:
            logger.info("waiting for auto-import to show the input(s) under %s on the file "
                        "system", link.repository)
    look_once = any(ln is not None and ln.lazy and not ln.auto_import for ln in links)
    if look_once:
        # Only objects present when the file system was created are listed: look once.
        staging = copy.copy(staging)
        staging.visible_timeout = 0
    try:
        mounted = staging.stage_in(bucket, keys)
    except FsxError as e:
        if look_once:
            what = f"s3://{bucket}/{keys[0]}" + (f" (and {len(keys) - 1} more)"
                                                  if len(keys) > 1 else "")
            raise FsxError(f"{what} is not on the SCRATCH file system: its ImportPath lists "
                           "only objects present when the file system was created; set "
                           "AutoImportPolicy in the cluster config or recreate the cluster"
                           ) from None
        raise FsxError(" ".join(str(e).split())) from None
    for m in mounted[:5]:
        logger.info("input on the file system at %s", m)
    return mounted


def run_job(spec: PipelineSpec, aws: AwsTarget, provider: Any, run: FsxRun, mounted_input: str,
            run_dir: Path, run_id: str, logger: Any) -> None:
    """The ranks and the hand-over to the export, in one batch script; retries resume."""
    info = spec.kernel_info
    out = f"{run.remote_dir}/out"
    checkpoints = f"{run.remote_dir}/checkpoints" if spec.kernel.checkpoint_every else None
    argv = python_module(info.module, *info.argv(
        spec.kernel.parameters, Path(mounted_input), Path(out),
        checkpoint_dir=Path(checkpoints) if checkpoints else None,
        checkpoint_every=spec.kernel.checkpoint_every, restart=checkpoints is not None))
    ranks = provider.launcher().command(spec.ranks, argv)
    command = [provider.python, "-m", "infra.staging.fsx_job", "--out", out, "--export",
               run.layout.mounted(run.export_fs), "--", *ranks]
    submit_and_wait(spec, provider, command, telemetry_env(aws, run_id,
                                                           spec.storage.results_bucket),
                    run_dir, logger)


def submit_and_wait(spec: PipelineSpec, provider: Any, command: list[str],
                    env: dict[str, str], run_dir: Path, logger: Any) -> None:
    """Submit, forward the job's output to the log, resubmit up to ``kernel.retries`` times;
    a cancelled flow cancels the job. The last failure raises :class:`MpiJobFailed`."""
    info = spec.kernel_info
    for attempt in range(spec.kernel.retries + 1):
        logger.info("launching on %s%s: %s", provider.label,
                    f" (attempt {attempt + 1})" if attempt else "", " ".join(command))
        job = provider.submit(command, ranks=spec.ranks, job_name=info.name, workdir=run_dir,
                              env=env)
        # The mirrors keep an earlier attempt's output: forward only what follows it.
        offsets = {p: p.stat().st_size if attempt else 0 for p in (job.stdout, job.stderr)}

        def on_poll(_: JobStatus, offsets: dict[Path, int] = offsets) -> None:
            for path in offsets:
                offsets[path] = forward(path, offsets[path], f"[{info.name}]", logger)

        try:
            status = wait(provider, job, on_poll=on_poll, backoff=Backoff())
        except BaseException:
            provider.cancel(job)
            raise
        if status.state is JobState.COMPLETED:
            return
    raise MpiJobFailed(f"{info.name} on {spec.ranks} ranks failed ({status.message}): "
                       f"{failure_lines(job.stderr.read_text(errors='replace'))}")


def _copy_verified(aws: AwsTarget, src: tuple[str, str], dest: tuple[str, str],
                   sha: str) -> None:
    """A server-side copy whose SHA-256 S3 computes and we compare."""
    aws.client("s3").copy_object(Bucket=dest[0], Key=dest[1], ChecksumAlgorithm="SHA256",
                                 CopySource={"Bucket": src[0], "Key": src[1]},
                                 MetadataDirective="REPLACE", Metadata={"sha256": sha})
    got = object_sha256(aws, *dest)
    if got != sha:
        raise VerifyError(f"s3://{dest[0]}/{dest[1]} has sha256 {got} after the copy from "
                          f"s3://{src[0]}/{src[1]}, not the job's {sha}")


def kept_note(spec: PipelineSpec, mounted: str) -> str:
    return (f"; the results stay at {mounted} on the file system until the cluster is "
            f"deleted (teardown: {spec.parallelcluster.teardown})")


def export_verified(spec: PipelineSpec, aws: AwsTarget, staging: FsxRunStaging, run: FsxRun,
                    export_fs: str, results_prefix: str,
                    ) -> tuple[dict[str, Any], list[Transferred], str]:
    """Export ``export_fs`` (file-system path), read the job's sums file back from S3 and
    verify every result there by sha256; with a SCRATCH ``ExportPath`` copy each one
    (server side, verified) to ``results_prefix``. Returns the sums record, the results as
    published (not yet any manifest) and the export task's id. One-line errors, each saying
    where the results still lie on the file system."""
    kept = kept_note(spec, run.layout.mounted(export_fs))
    try:
        result = staging.export(export_fs)
    except FsxError as e:  # one line, with the report's location and the failing paths
        raise FsxError(" ".join(str(e).split()) + kept) from None
    try:
        record = json.loads(staging.read_exported(aws, f"{export_fs}/{SUMS}"))
    except ValueError as e:
        raise VerifyError(f"the exported {SUMS} is not JSON ({e})") from None
    files = [{"name": n, "sha256": h} for n, h in record["sha256"].items()]
    try:
        where = staging.verify(aws, export_fs, files, result.task_id)
    except VerifyError as e:
        raise VerifyError(f"{e}{kept}") from None
    bucket = spec.storage.results_bucket
    sizes = {f["name"]: int(f.get("bytes", 0))
             for f in record.get("files") or record.get("manifest", {}).get("files", [])}
    sent = []
    for f, src in zip(files, where, strict=True):
        dest = (bucket, results_prefix + f["name"])
        if run.copy_to_results:
            _copy_verified(aws, src, dest, f["sha256"])
        sent.append(Transferred(f"s3://{dest[0]}/{dest[1]}",
                                Path(run.layout.mounted(f"{export_fs}/{f['name']}")),
                                sizes.get(f["name"], 0), f["sha256"]))
    logger_line = (f"export task {result.task_id}: {len(files)} result(s) verified by sha256 "
                   f"in s3://{bucket}/{results_prefix}"
                   + (" (copied from the SCRATCH ExportPath)" if run.copy_to_results else ""))
    staging.progress(logger_line)
    return record, sent, result.task_id


def stage_out_and_publish(spec: PipelineSpec, aws: AwsTarget, staging: FsxRunStaging,
                          run: FsxRun, run_dir: Path, logger: Any,
                          ) -> tuple[dict[str, Any], list[Transferred]]:
    """Export, verify every result in S3 against the job's sums, then the manifest, last."""
    record, sent, _ = export_verified(spec, aws, staging, run, run.export_fs,
                                      run.results_prefix)
    manifest, sums = record["manifest"], record["sha256"]
    if {f["name"]: f["sha256"] for f in manifest["files"]} != sums:
        raise VerifyError(f"the exported {SUMS} disagrees with the kernel's manifest")
    bucket = spec.storage.results_bucket
    local = run_dir / "out" / MANIFEST
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(json.dumps(manifest, indent=2) + "\n")
    sent.append(upload(aws, local, bucket, run.results_prefix + MANIFEST))
    logger.info("published the manifest %s", sent[-1].uri)
    return manifest, sent


def open_staging(spec: PipelineSpec, aws: AwsTarget, run: FsxRun, provider: Any, run_id: str,
                 logger: Any, fsx_client: Any = None) -> FsxRunStaging:
    """The run's staging through the cluster's file system (found by its tags, in the
    config's region), asking the head node what is visible and reporting failures under
    the results link's ``clusterflow-fsx-reports/<run id>``."""
    # The file system lives in the cluster's region (the config's Region), as the cluster does.
    fsx_aws = dataclasses.replace(aws, region=config_region(raw_config(spec), aws.region))
    results_link = next(ln for ln in run.layout.links if not ln.lazy and (
        ln.export_only or ln.s3_key(run.export_fs) is not None))
    report = f"{results_link.repository}clusterflow-fsx-reports/{run_id}"
    fs_id = file_system_id(fsx_aws, spec.parallelcluster.cluster_name, run.layout)
    return FsxRunStaging(Fsx(fsx_aws, client=fsx_client, poll_seconds=5), fs_id,
                         run.layout.links, visible=visible_on(provider.shell),
                         report_path=report, progress=logger.info)


def as_tasks(timed: Timed) -> Timed:
    """``timed`` with each stage a Prefect task of its name (seen in the UI like the other
    path's stages); for a flow run only, so the stages stay plain functions elsewhere."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def run(name: str, fn: Any, *args: Any) -> Any:
        return timed(name, task(fn, name=name, cache_policy=NO_CACHE), *args)
    return run


def run_through_fsx(spec: PipelineSpec, aws: AwsTarget, run_dir: Path, run_id: str,
                    logger: Any, timed: Timed, open_backend: Any, *,
                    fsx_client: Any = None, tasks: bool = False,
                    ) -> tuple[PipelineSpec, Transferred, dict[str, Any], list[Transferred]]:
    """Stage in, run and publish through the cluster's FSx; see the module docstring.

    Returns the (possibly re-sized) spec, the input, the run's record and what was published.
    ``fsx_client`` replaces the FSx client (tests stub the data repository task calls);
    ``tasks``: run the stages as Prefect tasks (inside a flow). With ``reuse_result`` (inside
    a flow) an earlier result for the same kernel, parameters and input bytes is copied in S3
    to this run's prefix instead: no cluster, no file system, no job.
    """
    stage = as_tasks(timed) if tasks else timed
    src = stage("stage_in", ensure_input, spec, aws, run_dir, logger)
    if spec.kernel.input_key is not None and spec.kernel.name == "heat":
        bucket, _, key = src.uri[len("s3://"):].partition("/")
        spec = grid_for_shape(spec, npy_shape(aws, bucket, key), Path(key).name)
    work = (spec, aws, run_dir, run_id, logger, timed, stage, open_backend, fsx_client, src)
    if not spec.reuse_result:
        return compute_through_fsx(*work)
    from prefect import task

    from flows.result_cache import result_cache_key

    cached = task(_compute_record, name="mpi_run", cache_key_fn=result_cache_key,
                  result_serializer="json", persist_result=True)
    outcome: dict[str, Any] = {}
    record = timed("mpi_run", cached, spec, src.sha256, work, outcome)
    if record["run_id"] == run_id:
        return outcome["result"]
    try:
        sent = timed("fetch_result", copy_result, spec, aws, record, run_id, run_dir, logger)
    except (IntegrityError, VerifyError, ClientError) as e:
        logger.warning("cannot reuse run %s (%s); computing again", record["run_id"], e)
        timed("mpi_run", cached.with_options(refresh_cache=True), spec, src.sha256, work,
              outcome)
        return outcome["result"]
    return spec, src, record, sent  # the input was never staged


def compute_through_fsx(spec: PipelineSpec, aws: AwsTarget, run_dir: Path, run_id: str,
                        logger: Any, timed: Timed, stage: Timed, open_backend: Any,
                        fsx_client: Any, src: Transferred,
                        ) -> tuple[PipelineSpec, Transferred, dict[str, Any], list[Transferred]]:
    run = plan_run(spec, run_id, run_dir)
    with contextlib.ExitStack() as stack:
        provider = timed("cluster", stack.enter_context, open_backend(spec, aws, logger))
        staging = open_staging(spec, aws, run, provider, run_id, logger, fsx_client)
        mounted = stage("stage_in_fsx", stage_in_fsx, staging, run, src, logger)
        stage("mpi_run", run_job, spec, aws, provider, run, mounted, run_dir, run_id, logger)
        manifest, sent = stage("publish", stage_out_and_publish, spec, aws, staging, run,
                               run_dir, logger)
    staged = Transferred(src.uri, Path(mounted), src.bytes, src.sha256)
    return spec, staged, {"run_id": run_id, "manifest": manifest}, sent


def _compute_record(spec: PipelineSpec, input_sha256: str, work: tuple[Any, ...],
                    outcome: dict[str, Any]) -> dict[str, Any]:
    """The cached unit of a reusable result: the whole FSx run; its record (this run's id
    and manifest) is what a later run with the same key gets back without running it."""
    outcome["result"] = compute_through_fsx(*work)
    return outcome["result"][2]


def copy_result(spec: PipelineSpec, aws: AwsTarget, record: dict[str, Any], run_id: str,
                run_dir: Path, logger: Any) -> list[Transferred]:
    """An earlier run's results copied in S3 (server side, SHA-256 computed by S3 and
    compared with its manifest) to this run's prefix, then the manifest, last."""
    bucket, prefix = spec.storage.results_bucket, f"{spec.storage.results_prefix}{run_id}/"
    earlier = f"{spec.storage.results_prefix}{record['run_id']}/"
    manifest, sent = record["manifest"], []
    for f in manifest["files"]:
        _copy_verified(aws, (bucket, earlier + f["name"]), (bucket, prefix + f["name"]),
                       f["sha256"])
        sent.append(Transferred(f"s3://{bucket}/{prefix}{f['name']}", Path(f["name"]),
                                int(f.get("bytes", 0)), f["sha256"]))
    local = run_dir / "out" / MANIFEST
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(json.dumps({**manifest, "reused_from": record["run_id"]}, indent=2) + "\n")
    sent.append(upload(aws, local, bucket, prefix + MANIFEST))
    logger.info("reused the result of run %s (same kernel, parameters and input): %d file(s) "
                "copied in S3 and verified, nothing ran", record["run_id"], len(sent) - 1)
    return sent
