"""The ParallelCluster provider: ``sbatch`` on the head node through SSM Run Command.

``submit`` writes a batch script into ``<remote_root>/<run dir name>/`` on the cluster's
shared storage (FSx for Lustre in the shipped configs, so every compute node sees it) and
submits it with ``sbatch --parsable`` as ``run_as`` (ParallelCluster's default user), in the
queue ``partition``. The script records its exit code in ``<job>.exitcode`` on exit, which
outlives Slurm's memory of finished jobs (``MinJobAge``) and marks the cluster's last
activity for the idle teardown.

``status`` runs one small script per poll: the exit-code file, ``scontrol show job -o``, and
the next chunk (base64) of the job's stdout/stderr, which it appends to the local mirror
files of the ``JobHandle`` so the pipeline forwards them to the Prefect log as for any other
provider. ``cancel`` is ``scancel``. The launcher is ``srun --mpi=pmix`` (ParallelCluster's
Slurm is built with PMIx) with the cluster's interpreter in place of this machine's.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from infra.backends.providers.base import (
    ArrayItem,
    ExecutionProvider,
    JobHandle,
    JobState,
    JobStatus,
)
from infra.backends.providers.remote import append, mirror_paths, remote_argv
from infra.backends.providers.spot import Interruptions, parse_attempts, requeue_guard
from infra.backends.remote_shell import RemoteCommandError, RemoteShell, run_checked
from infra.backends.shell_safety import (
    PLAIN_PATH,
    UnsafeValue,
    export_line,
    heredoc,
    reject_control_chars,
    render_command,
    safe_arg,
)
from infra.backends.srun_guard import EXIT_NOT_LAUNCHED, NOT_LAUNCHED_MARK
from infra.clusters.parallelcluster import SLURM_PATH, sections

CHUNK = 7000  # bytes per stream per poll: two base64 chunks stay under SSM's 24,000 chars
SCONTROL_STATES = {
    "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING, "RESV_DEL_HOLD": JobState.PENDING,
    "RUNNING": JobState.RUNNING, "COMPLETING": JobState.RUNNING, "SUSPENDED": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING, "SIGNALING": JobState.RUNNING, "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED, "CANCELLED": JobState.CANCELLED,
    "FAILED": JobState.FAILED, "TIMEOUT": JobState.FAILED, "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED, "BOOT_FAIL": JobState.FAILED, "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # fullmatch: "$" alone would allow a final "\n"
_SAFE_ROOT = re.compile(PLAIN_PATH)  # the shared root goes into #SBATCH lines as it is


@dataclass(frozen=True)
class SrunLauncher:
    python: str = "python3"
    mpi: str = "pmix"

    def command(self, ranks: int, argv: list[str]) -> list[str]:
        return ["srun", f"--mpi={self.mpi}", "-n", str(ranks), *remote_argv(argv, self.python)]


@dataclass(frozen=True)
class RemoteJob:
    job_id: str
    directory: str
    name: str
    offsets: dict[str, int] = field(default_factory=lambda: {"out": 0, "err": 0})
    mirrored: bool = True  # False: the local "mirror" is the job's own file (shared mount)


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o ID`` -> its key=value fields (values without spaces suffice)."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def exit_file(text: str, restarts: str = "") -> int | None:
    """The exit code in ``<job>.exitcode`` (``RC`` or ``RC ATTEMPT``), or None.

    A requeue-able job's trap also writes the attempt (``SLURM_RESTART_COUNT``): the attempt a
    Spot reclaim killed leaves its file too, and Slurm has counted the requeue (``Restarts=``)
    before it signals the script, so a file from an attempt older than ``Restarts`` is not the
    job's result: the job is still on its way (requeued, pending, or running again).
    """
    words = text.split()
    if not words or not words[0].lstrip("-").isdigit():
        return None
    if len(words) > 1 and words[1].isdigit() and restarts.isdigit() \
            and int(words[1]) < int(restarts):
        return None
    return int(words[0])


def status_from(exit_text: str, scontrol_text: str) -> JobStatus:
    """Combine the job's exit-code file and scontrol's view into one status."""
    fields = parse_scontrol(scontrol_text)
    raw_state = fields.get("JobState", "")
    state = SCONTROL_STATES.get(raw_state)
    exit_code = exit_file(exit_text, fields.get("Restarts", ""))
    if state is JobState.CANCELLED:
        return JobStatus(JobState.CANCELLED, exit_code, f"Slurm: {raw_state}")
    if state is not None and state.terminal:
        code = exit_code
        if code is None and ":" in fields.get("ExitCode", ""):
            code = int(fields["ExitCode"].split(":")[0])
        if state is JobState.COMPLETED and code:
            state = JobState.FAILED
        reason = fields.get("Reason", "")
        detail = f"Slurm: {raw_state}" + (f" ({reason})" if reason not in ("", "None") else "")
        return JobStatus(state, code, detail + (f", exit code {code}" if code else ""))
    if exit_code is not None:  # the batch script has ended; Slurm may still be completing
        if exit_code == 0:
            return JobStatus(JobState.COMPLETED, 0, "exit code 0")
        return JobStatus(JobState.FAILED, exit_code, f"exit code {exit_code}")
    if state is not None:
        return JobStatus(state, None, f"Slurm: {raw_state}")
    return JobStatus(JobState.FAILED, None,
                     "the job is gone from Slurm and left no exit code (node failure, or the "
                     f"controller forgot it): {scontrol_text.strip()[:300]}")


@dataclass
class ParallelClusterProvider(ExecutionProvider):
    shell: RemoteShell
    remote_root: str = "/fsx/clusterflow"
    partition: str | None = None
    run_as: str | None = "ec2-user"
    python: str = "python3"
    mpi: str = "pmix"
    sbatch_args: list[str] = field(default_factory=list)
    # A Spot queue: requeued when a node is reclaimed, resumed, bounded (providers.spot).
    requeue: bool = False
    max_interruptions: int = 3
    label: str = "parallelcluster"
    _jobs: dict[str, RemoteJob] = field(default_factory=dict, init=False)
    _attempts: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        # Everything below lands in scripts run as root through SSM: refuse what could not
        # be quoted (a #SBATCH directive cannot be) before anything is sent.
        if not _SAFE_ROOT.fullmatch(self.remote_root):
            raise UnsafeValue(f"remote_root {self.remote_root!r} must be an absolute path of "
                              "letters, digits and . _ + @ - /")
        for what, value in (("partition", self.partition), ("run_as", self.run_as),
                            ("python", self.python), ("mpi", self.mpi)):
            if value is not None:
                reject_control_chars(value, what)
        for k, arg in enumerate(self.sbatch_args):
            reject_control_chars(arg, f"sbatch_args[{k}]")

    def launcher(self) -> SrunLauncher:
        return SrunLauncher(python=self.python, mpi=self.mpi)

    def _as_user(self, command: str) -> str:
        if not self.run_as:
            return command
        return f"sudo -iu {safe_arg(self.run_as, 'run_as')} bash -c {shlex.quote(command)}"

    def _directives(self, *, ranks: int, job_name: str, directory: str, stem: str,
                    array: str | None = None) -> list[str]:
        """The ``#SBATCH`` lines (nothing in them can be quoted: each value is checked)."""
        for what, value in (("job name", job_name), ("directory", directory)):
            if not (_SAFE_NAME if what == "job name" else _SAFE_ROOT).fullmatch(value):
                raise UnsafeValue(f"{what} {value!r} cannot go into a #SBATCH line")
        if self.partition and not _SAFE_NAME.fullmatch(self.partition):
            raise UnsafeValue(f"partition {self.partition!r} cannot go into a #SBATCH line")
        lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --ntasks={ranks}"]
        if array is not None:
            lines.append(f"#SBATCH --array={array}")
        lines += [f"#SBATCH --output={directory}/{stem}.out",
                  f"#SBATCH --error={directory}/{stem}.err",
                  f"#SBATCH --chdir={directory}"]
        if self.partition:
            lines.append(f"#SBATCH --partition={self.partition}")
        if self.requeue:  # append: a requeue would truncate what status() reads by offset
            lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
        lines += [f"#SBATCH {a}" for a in self.sbatch_args]
        return lines

    def _on_exit(self, stem: str) -> list[str]:
        """The trap that leaves ``<stem>.exitcode`` on exit (``stem``: shell text, quoted),
        which outlives Slurm's memory of the job.

        srun exits 0 when its tasks fail to launch (``srun: error: task N launch failed``);
        the trap looks for those lines in what this attempt added to ``<stem>.err`` and then
        ends the job with 126, as :mod:`infra.backends.srun_guard` does off the cluster.
        """
        q = shlex.quote
        exitcode, tmp, err = f"{stem}.exitcode", f"{stem}.exitcode.tmp", f"{stem}.err"
        not_launched = (f"tail -c +$((cf_err0 + 1)) {err} 2>/dev/null | "
                        f"grep -qE {q(r'^srun: error: task [0-9][0-9,-]* launch failed')}")
        said = (f"{NOT_LAUNCHED_MARK} its tasks did not all launch; the step's ranks did not "
                f"all run, so it ends with exit code {EXIT_NOT_LAUNCHED}")
        # The attempt goes with the code: a reclaimed attempt's file is not the result.
        on_exit = (f'rc=$?; if [ "$rc" = 0 ] && {not_launched}; then echo {q(said)} >&2; '
                   f'rc={EXIT_NOT_LAUNCHED}; fi; echo "$rc ${{SLURM_RESTART_COUNT:-0}}" > {tmp} && '
                   f'mv {tmp} {exitcode}; exit "$rc"')
        return [f"cf_err0=$(stat -c %s {err} 2>/dev/null || echo 0)", f"trap {q(on_exit)} EXIT"]

    def batch_script(self, command: list[str], *, ranks: int, job_name: str, directory: str,
                     env: dict[str, str] | None) -> str:
        lines = self._directives(ranks=ranks, job_name=job_name, directory=directory,
                                 stem=job_name)
        lines += self._on_exit(shlex.quote(f"{directory}/{job_name}"))
        if self.requeue:
            lines += requeue_guard(PurePosixPath(f"{directory}/{job_name}.attempts"),
                                   self.max_interruptions)
        lines += [export_line(k, v) for k, v in sorted((env or {}).items())]
        lines.append(render_command(command))
        return "\n".join(lines) + "\n"

    def array_script(self, items: Sequence[ArrayItem], *, ranks: int, job_name: str,
                     directory: str, max_parallel: int) -> str:
        """ONE batch script for a sweep's job array: each element runs its own point's
        command with its own env, picked by ``$SLURM_ARRAY_TASK_ID``, and leaves
        ``<job>_<index>.{out,err,exitcode}`` as a single job leaves ``<job>.*``. Every
        command and value is shell-quoted, so nothing from a spec can become code in it."""
        indices = ",".join(str(int(i.index)) for i in items)
        lines = self._directives(ranks=ranks, job_name=job_name, directory=directory,
                                 stem=f"{job_name}_%a",
                                 array=f"{indices}%{max(1, int(max_parallel))}")
        stem = shlex.quote(f"{directory}/{job_name}_") + '"${SLURM_ARRAY_TASK_ID}"'
        lines += self._on_exit(stem)
        if self.requeue:
            lines += requeue_guard(f"{directory}/{job_name}_", self.max_interruptions,
                                   array_stem=True)
        lines.append('case "$SLURM_ARRAY_TASK_ID" in')
        for item in items:
            exports = "".join(f"{export_line(k, v)}; " for k, v in sorted(item.env.items()))
            lines.append(f"  {int(item.index)}) {exports}{render_command(item.command)} ;;")
        lines += ['  *) echo "clusterflow: no command for array index $SLURM_ARRAY_TASK_ID" >&2',
                  "     exit 2 ;;", "esac"]
        return "\n".join(lines) + "\n"

    def submit_script(self, batch_script: str, *, directory: str, job_name: str,
                      stems: Sequence[str] = ()) -> str:
        """Write ``<job>.sbatch`` (as root through SSM) and submit it as ``run_as``; the
        records of an earlier job of the same names (``stems``: the array's elements) go."""
        path = f"{directory}/{job_name}.sbatch"
        owner = (f"chown -R {shlex.quote(self.run_as)} {shlex.quote(directory)}"
                 if self.run_as else "true")
        stale = [f"{directory}/{stem}.{ext}" for stem in (stems or [job_name])
                 for ext in ("exitcode", "attempts")]
        return "\n".join([
            "set -euo pipefail",
            SLURM_PATH,
            f"mkdir -p {shlex.quote(directory)}",
            f"rm -f {render_command(stale)}",
            # The delimiter never equals a line of the script, so the script cannot end the
            # heredoc early and run its remaining lines here, as root.
            *heredoc(path, batch_script, "CLUSTERFLOW_SBATCH"),
            owner,
            self._as_user(f"{SLURM_PATH}; sbatch --parsable {shlex.quote(path)}"),
        ])

    def _directory(self, job_name: str, workdir: Path) -> str:
        if not _SAFE_NAME.fullmatch(job_name) or not _SAFE_NAME.fullmatch(workdir.name):
            raise ValueError(f"job name {job_name!r} and run directory {workdir.name!r} must be "
                             "letters, digits, '.', '_' or '-'")
        return f"{self.remote_root.rstrip('/')}/{workdir.name}"

    def _sbatch(self, script: str, what: str) -> str:
        result = run_checked(self.shell, script, what=what)
        lines = [ln for ln in result.stdout.strip().splitlines() if ln.strip()]
        job_id = lines[-1].split(";")[0].strip() if lines else ""
        if not job_id.isdigit():
            raise RemoteCommandError(f"sbatch did not return a job id: {result.stdout!r}")
        return job_id

    def _track(self, job_id: str, directory: str, name: str, workdir: Path) -> JobHandle:
        out, err = mirror_paths(workdir, name)
        # Where clusterflow runs on the cluster's mount (scratch_dir is remote_root) the
        # mirror IS the job's own file: read it by offset, never append it to itself.
        mirrored = Path(directory).resolve() != workdir.resolve()
        self._jobs[job_id] = RemoteJob(job_id, directory, name, mirrored=mirrored)
        return JobHandle(job_id=job_id, stdout=out, stderr=err)

    def submit(self, command: list[str], *, ranks: int, job_name: str, workdir: Path,
               env: dict[str, str] | None = None) -> JobHandle:
        directory = self._directory(job_name, workdir)
        script = self.batch_script(command, ranks=ranks, job_name=job_name,
                                   directory=directory, env=env)
        job_id = self._sbatch(self.submit_script(script, directory=directory,
                                                 job_name=job_name), f"sbatch {job_name}")
        return self._track(job_id, directory, job_name, workdir)

    def submit_array(self, items: Sequence[ArrayItem], *, ranks: int, job_name: str,
                     workdir: Path, max_parallel: int) -> list[JobHandle]:
        """Submit ``items`` as ONE Slurm job array (``--array=i,j,k%max_parallel``) on the
        head node; a handle per item (``ARRAYID_INDEX``), each polled like a single job."""
        directory = self._directory(job_name, workdir)
        script = self.array_script(items, ranks=ranks, job_name=job_name,
                                   directory=directory, max_parallel=max_parallel)
        stems = [f"{job_name}_{int(i.index)}" for i in items]
        array_id = self._sbatch(self.submit_script(script, directory=directory,
                                                   job_name=job_name, stems=stems),
                                f"sbatch --array {job_name}")
        return [self._track(f"{array_id}_{int(i.index)}", directory, stem, workdir)
                for i, stem in zip(items, stems, strict=True)]

    def status_script(self, job: RemoteJob) -> str:
        d, n = shlex.quote(job.directory), job.name
        lines = [SLURM_PATH, "echo '==exit=='", f"cat {d}/{n}.exitcode 2>/dev/null || true",
                 "echo '==scontrol=='", f"scontrol show job -o {job.job_id} 2>&1 || true",
                 "echo '==attempts=='", f"cat {d}/{n}.attempts 2>/dev/null || true"]
        for stream in ("out", "err"):
            lines += [f"echo '=={stream}=='",
                      f"tail -c +{job.offsets[stream] + 1} {d}/{n}.{stream} 2>/dev/null | "
                      f"head -c {CHUNK} | base64 -w0; echo"]
        return "\n".join(lines)

    def _remote(self, job: JobHandle) -> RemoteJob:
        try:
            return self._jobs[job.job_id]
        except KeyError:
            raise ValueError(f"job {job.job_id} was not submitted by this provider") from None

    def status(self, job: JobHandle) -> JobStatus:
        remote = self._remote(job)
        result = self.shell.run(self.status_script(remote), comment="clusterflow status")
        if result.status != "Success":
            raise RemoteCommandError(f"status of Slurm job {job.job_id} could not be read "
                                     f"({result.status}): {result.stderr.strip()[-500:]}")
        parts = sections(result.stdout)
        for stream, path in (("out", job.stdout), ("err", job.stderr)):
            data = base64.b64decode(parts.get(stream, "").strip() or b"")
            if remote.mirrored:
                append(path, data)
            remote.offsets[stream] += len(data)
        self._attempts[job.job_id] = parts.get("attempts", "")
        status = status_from(parts.get("exit", ""), parts.get("scontrol", ""))
        if status.state.terminal and any(len(base64.b64decode(parts.get(s, "").strip() or b""))
                                         == CHUNK for s in ("out", "err")):
            # Output is still being fetched: report RUNNING until the mirrors are complete.
            return JobStatus(JobState.RUNNING, None, "fetching output")
        return status

    def interruptions(self, job: JobHandle) -> Interruptions:
        """Requeues after a reclaim and the time their attempts ran, as of the last status."""
        return parse_attempts(self._attempts.get(job.job_id, ""))

    def cancel(self, job: JobHandle) -> None:
        run_checked(self.shell, f"{SLURM_PATH}\nscancel {shlex.quote(job.job_id)}",
                    what=f"scancel {job.job_id}")
