"""The slurm provider: a job is an ``sbatch`` batch job; ranks start inside it via srun.

Submission writes a batch script into the run's workdir (it records the exact ``sbatch`` line,
so a user can resubmit it by hand) and calls ``sbatch --parsable``. Status comes from
``scontrol show job -o ID`` (one job, ~10 ms; ``squeue --json`` on 22.05 ignores ``-j`` and
returns every job the controller holds), and from the job completion log
(``sacct -c -j ID``, with ``JobCompType=jobcomp/filetxt``) once the controller has forgotten
the job. Cancel is ``scancel`` and waits until every process of the job is gone.

Which Slurm: ``slurm_conf`` if given, else ``$SLURM_CONF``, else the local cluster that
``make slurm`` runs (``$CLUSTERFLOW_HOME/slurm/slurm.conf``) if it exists, else Slurm's own
default (``/etc/slurm/slurm.conf`` on a real cluster's login node). A controller that does not
answer is reported at submit, at once (``scontrol ping``), with what to do about it.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from infra.backends.launchers import MpiexecLauncher, SrunLauncher
from infra.backends.providers.base import (
    ArrayItem,
    ExecutionProvider,
    JobHandle,
    JobState,
    JobStatus,
)
from infra.backends.providers.polling import ProviderUnavailable
from infra.backends.providers.spot import (
    Interruptions,
    attempts_file,
    attempts_of,
    read_interruptions,
    requeue_guard,
)
from infra.backends.shell_safety import export_line, reject_control_chars, render_command

LAUNCHERS = ("srun", "mpiexec")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
MAKE_HINT = "run `make slurm` (python -m infra.clusters.slurm_local up) to start the local Slurm"

# Slurm's job states (squeue/scontrol long names) as the provider contract's five.
STATE_MAP: dict[str, JobState] = {
    **dict.fromkeys(("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                     "RESV_DEL_HOLD"), JobState.PENDING),
    # COMPLETING: the script ended but processes are still being cleaned up; the outputs are
    # only complete once the job leaves this state.
    **dict.fromkeys(("RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "STOPPED",
                     "SUSPENDED"), JobState.RUNNING),
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELLED,
    **dict.fromkeys(("FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                     "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"), JobState.FAILED),
}
_TIME_LIMIT_RE = re.compile(
    r"^(UNLIMITED|INFINITE|\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}"
    r"|\d+-\d+:\d{1,2}:\d{1,2})$")
_DOES_NOT_FIT = ("Requested node configuration is not available",
                 "More processors requested than permitted", "Node count specification invalid")
# ArrayTaskId of the one record left for an array whose elements all ended unsplit
# (Slurm's NO_VAL - 1).
WHOLE_ARRAY = "4294967294"
_UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out",
                "Connection refused", "Zero Bytes were transmitted")


class SlurmError(RuntimeError):
    """Slurm refused or failed a request; the message carries Slurm's own words."""


class SlurmUnavailable(SlurmError, ProviderUnavailable):
    """Slurm's commands are missing, its config is missing, or its controller does not answer."""


class SlurmJobUnknown(SlurmError):
    """Neither the controller nor the job completion log knows the job: it is gone without a
    record (another cluster's id, or a controller restarted without its state)."""


def valid_time_limit(value: str) -> bool:
    """Slurm's --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    return bool(_TIME_LIMIT_RE.fullmatch(value))


def default_slurm_conf() -> Path | None:
    """The config Slurm's commands should use; None leaves Slurm to its compiled-in default.

    With no config anywhere this is the local cluster's (missing) path, so the error says
    "run `make slurm`" at once instead of Slurm retrying for a minute.
    """
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"])
    from infra.clusters.slurm_local.layout import default_state_dir

    local = default_state_dir() / "slurm.conf"
    return None if not local.exists() and SYSTEM_CONF.exists() else local


def _exit_code(text: str) -> int | None:
    """Slurm's ``E:S`` (exit status, signal) as one number: the signal negated, like Popen."""
    m = re.match(r"^(\d+):(\d+)$", text.strip())
    if not m:
        return None
    code, sig = int(m[1]), int(m[2])
    return -sig if sig else code


def _status(state: str, exit_code: int | None, reason: str = "") -> JobStatus:
    base = state.split()[0].rstrip("+") if state else ""
    mapped = STATE_MAP.get(base)
    message = state.lower() if reason in ("", "None", "(null)") else f"{state.lower()}: {reason}"
    if mapped is None:  # a state this code does not know: keep polling, but say so
        return JobStatus(JobState.RUNNING, None, f"unrecognised Slurm state {state!r}")
    if not mapped.terminal:
        exit_code = None  # Slurm says 0:0 until the job ends
    if mapped is JobState.FAILED and exit_code not in (None, 0):
        message += f" (exit code {exit_code})" if exit_code > 0 else f" (signal {-exit_code})"
    return JobStatus(mapped, exit_code, message)


def _array_indices(text: str) -> list[int]:
    """``3``, ``0-7%2`` or ``1,3,5-6%4`` as the indices they name."""
    out: list[int] = []
    for part in text.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out += range(int(lo), int(hi or lo) + 1)
    return out


class SlurmProvider(ExecutionProvider):
    """Jobs on a Slurm cluster, one ``sbatch`` per ``submit``."""

    label = "slurm"

    def __init__(self, *, partition: str | None = None, time_limit: str | int | None = None,
                 launcher: str = "srun", slurm_conf: Path | str | None = None,
                 overcommit: bool = False, sbatch_args: Sequence[str] = (),
                 cancel_timeout: float = 60.0,
                 command_timeout: float = 60.0, requeue: bool = False,
                 max_interruptions: int = 3) -> None:
        if launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
        if time_limit is not None and not valid_time_limit(str(time_limit)):
            raise ValueError(f"time limit {time_limit!r} is not a Slurm time (minutes, "
                             "HH:MM:SS or D-HH:MM:SS)")
        # The batch script records these; a newline in one would start a line of its own.
        for k, arg in enumerate(sbatch_args):
            reject_control_chars(arg, f"sbatch_args[{k}]")
        if partition is not None:
            reject_control_chars(partition, "partition")
        self.partition = partition
        self.time_limit = None if time_limit is None else str(time_limit)
        self.launcher_name = launcher
        self.slurm_conf = Path(slurm_conf) if slurm_conf else default_slurm_conf()
        self.overcommit = overcommit
        self.sbatch_args = tuple(sbatch_args)
        # Spot: requeued when the node is reclaimed, resumed, bounded (providers.spot).
        self.requeue, self.max_interruptions = requeue, max_interruptions
        self.cancel_timeout = cancel_timeout
        self.command_timeout = command_timeout
        # One `scontrol show job ARRAY` answers for every element of an array: pollers of
        # the same array share it for a moment instead of each asking the controller.
        self._array_cache: dict[str, tuple[float, dict[int, JobStatus]]] = {}
        self._array_lock = threading.Lock()

    # ---- plumbing

    def env(self) -> dict[str, str]:
        """The environment Slurm's commands (and, through sbatch, the job) run with."""
        env = dict(os.environ)
        if self.slurm_conf is not None:
            env["SLURM_CONF"] = str(self.slurm_conf)
        return env

    def _hint(self) -> str:
        from infra.clusters.slurm_local.layout import default_state_dir

        if self.slurm_conf is None or self.slurm_conf == default_state_dir() / "slurm.conf":
            return MAKE_HINT
        return f"check that slurmctld runs and that {self.slurm_conf} is its config"

    def _slurm(self, *args: str) -> subprocess.CompletedProcess[str]:
        if self.slurm_conf is not None and not self.slurm_conf.exists():
            # Slurm itself would retry a missing config for 60 s before failing.
            raise SlurmUnavailable(f"Slurm config {self.slurm_conf} does not exist: "
                                   f"{self._hint()}, or set SLURM_CONF")
        try:
            proc = subprocess.run(list(args), capture_output=True, text=True, env=self.env(),
                                  timeout=self.command_timeout, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SlurmUnavailable(f"Slurm's `{args[0]}` command is not installed: "
                                   f"{self._hint()}") from None
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(args)}` did not answer within "
                                   f"{self.command_timeout:.0f} s: {self._hint()}") from None
        if proc.returncode != 0 and any(s in proc.stderr for s in _UNREACHABLE):
            raise SlurmUnavailable(f"the Slurm controller does not answer "
                                   f"({proc.stderr.strip()}): {self._hint()}")
        return proc

    def ping(self) -> None:
        """Fail fast when no controller answers (a plain command would retry for ~10 s)."""
        proc = self._slurm("scontrol", "ping")
        if proc.returncode != 0 or " is UP" not in proc.stdout:
            said = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
            raise SlurmUnavailable(f"the Slurm controller does not answer "
                                   f"({said[0] if said else 'no answer'}): {self._hint()}")

    # ---- the contract

    def launcher(self) -> SrunLauncher | MpiexecLauncher:
        if self.launcher_name == "mpiexec":
            # Inside the allocation Open MPI takes its slots from Slurm; oversubscribe only
            # when the job was allowed more ranks than CPUs (overcommit).
            return MpiexecLauncher(oversubscribe=self.overcommit)
        return SrunLauncher()

    def sbatch_command(self, *, ranks: int, job_name: str, workdir: Path, stdout: Path,
                       stderr: Path, script: Path, requeue: bool = False) -> list[str]:
        # '%' starts a filename pattern (%j = job id) for sbatch; '%%' is a literal one.
        cmd = ["sbatch", "--parsable", f"--job-name={job_name}", f"--ntasks={ranks}",
               f"--output={str(stdout).replace('%', '%%')}",
               f"--error={str(stderr).replace('%', '%%')}", f"--chdir={workdir}"]
        if self.partition:
            cmd.append(f"--partition={self.partition}")
        if self.time_limit:
            cmd.append(f"--time={self.time_limit}")
        if self.overcommit:
            cmd.append("--overcommit")
        if requeue:  # the script carries the max_interruptions guard (spot.requeue_guard)
            cmd += ["--requeue", "--open-mode=append"]
        return [*cmd, *self.sbatch_args, str(script)]

    def submit(self, command: list[str], *, ranks: int, job_name: str, workdir: Path,
               env: dict[str, str] | None = None) -> JobHandle:
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        out, err = workdir / f"{job_name}.out", workdir / f"{job_name}.err"
        script = workdir / f"{job_name}.sbatch"
        sbatch = self.sbatch_command(ranks=ranks, job_name=job_name, workdir=workdir,
                                     stdout=out, stderr=err, script=script,
                                     requeue=self.requeue)
        lines = ["#!/bin/bash",
                 "# Written by clusterflow's slurm provider. Submitted as:",
                 f"#   {render_command(sbatch)}"]
        if self.slurm_conf is not None:
            lines.append(f"#   with SLURM_CONF={render_command([str(self.slurm_conf)])}")
        lines += [export_line(k, v) for k, v in (env or {}).items()]
        if self.requeue:
            lines += requeue_guard(attempts_file(workdir, job_name), self.max_interruptions)
        # exec: the batch step's exit status is the launcher's, so Slurm reports the ranks'.
        lines.append(f"exec {render_command(command)}")
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        # Readers (the pipeline's log forwarding) can open them before the job starts.
        out.write_bytes(b"")
        err.write_bytes(b"")
        attempts_file(workdir, job_name).unlink(missing_ok=True)
        self.ping()
        proc = self._slurm(*sbatch)
        if proc.returncode != 0:
            raise SlurmError(self._explain_refusal(proc.stderr.strip(), ranks))
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch answered {proc.stdout.strip()!r}, not a job id")
        return JobHandle(job_id=job_id, stdout=out, stderr=err)

    def _explain_refusal(self, stderr: str, ranks: int) -> str:
        msg = f"sbatch refused the job: {stderr}"
        if any(s in stderr for s in _DOES_NOT_FIT):
            cpus = self._slurm("sinfo", "-h", "-o", "%D nodes x %c CPUs (partition %P)")
            msg += (f". {ranks} ranks do not fit the cluster ({cpus.stdout.strip() or '?'}): "
                    "ask for fewer ranks or another partition, or let ranks share CPUs "
                    "(slurm.overcommit: true)")
        elif "invalid partition" in stderr.lower():
            parts = self._slurm("sinfo", "-h", "-o", "%P")
            msg += f". Partitions: {', '.join(parts.stdout.split()) or '?'}"
        return msg

    def submit_array(self, items: Sequence[ArrayItem], *, ranks: int, job_name: str,
                     workdir: Path, max_parallel: int) -> list[JobHandle]:
        """Submit ``items`` as ONE job array (``--array=i,j,k%max_parallel``), one element per
        item, each with ``ranks`` tasks; returns a handle per item (``ARRAYID_INDEX``).

        One script serves every element: it picks the element's command by
        ``$SLURM_ARRAY_TASK_ID``. Every command and value is shell-quoted, so nothing from a
        spec can become code in it.
        """
        workdir = workdir.resolve()
        logs = workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        script = workdir / f"{job_name}.sbatch"
        indices = ",".join(str(i.index) for i in items)
        sbatch = self.sbatch_command(ranks=ranks, job_name=job_name, workdir=workdir,
                                     stdout=logs / "%a.out", stderr=logs / "%a.err",
                                     script=script, requeue=self.requeue)
        # sbatch_command doubles '%' for literal paths; the array's %a must stay a pattern.
        sbatch = [a.replace("%%a.", "%a.") for a in sbatch]
        sbatch.insert(-1, f"--array={indices}%{max_parallel}")
        lines = ["#!/bin/bash",
                 "# Written by clusterflow's slurm provider: one job array. Submitted as:",
                 f"#   {render_command(sbatch)}"]
        if self.slurm_conf is not None:
            lines.append(f"#   with SLURM_CONF={render_command([str(self.slurm_conf)])}")
        if self.requeue:  # bounded and recorded per element: logs/<index>.attempts
            lines += requeue_guard(logs, self.max_interruptions, array_dir=True)
        lines.append('case "$SLURM_ARRAY_TASK_ID" in')
        for item in items:
            exports = "".join(f"{export_line(k, v)}; " for k, v in item.env.items())
            lines.append(f"  {int(item.index)}) cd {render_command([str(item.workdir)])} && "
                         f"{exports}exec {render_command(item.command)} ;;")
        lines += ["esac",
                  'echo "clusterflow: no command for array index $SLURM_ARRAY_TASK_ID" >&2',
                  "exit 2"]
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)
        handles = []
        for item in items:
            out, err = logs / f"{item.index}.out", logs / f"{item.index}.err"
            out.write_bytes(b"")
            err.write_bytes(b"")
            attempts_of(out).unlink(missing_ok=True)
            handles.append((item.index, out, err))
        self.ping()
        proc = self._slurm(*sbatch)
        if proc.returncode != 0:
            raise SlurmError(self._explain_refusal(proc.stderr.strip(), ranks))
        array_id = proc.stdout.strip().split(";")[0]
        if not array_id.isdigit():
            raise SlurmError(f"sbatch answered {proc.stdout.strip()!r}, not a job id")
        return [JobHandle(job_id=f"{array_id}_{i}", stdout=out, stderr=err)
                for i, out, err in handles]

    def _array_status(self, array_id: str, index: int) -> JobStatus | None:
        """An array element's status from one shared ``scontrol show job ARRAY`` (~0.3 s old
        at most); None when the controller no longer knows the element."""
        with self._array_lock:
            cached = self._array_cache.get(array_id)
            if cached is None or time.monotonic() - cached[0] > 0.3:
                proc = self._slurm("scontrol", "show", "job", "-o", array_id)
                states: dict[int, JobStatus] = {}
                if proc.returncode == 0:
                    for line in proc.stdout.splitlines():
                        f = dict(re.findall(r"(?:^|\s)(JobState|ExitCode|Reason|ArrayTaskId)"
                                            r"=(\S*)", line))
                        if "ArrayTaskId" not in f or "JobState" not in f:
                            continue
                        st = _status(f["JobState"], _exit_code(f.get("ExitCode", "")),
                                     f.get("Reason", ""))
                        if f["ArrayTaskId"] == WHOLE_ARRAY:
                            # Every element ended before the array was split (scancel of a
                            # pending array): one record speaks for all of them.
                            states[-1] = st
                            continue
                        for idx in _array_indices(f["ArrayTaskId"]):
                            states[idx] = st
                elif "Invalid job id" not in proc.stderr:
                    raise SlurmError(f"scontrol show job {array_id} failed: "
                                     f"{proc.stderr.strip()}")
                cached = (time.monotonic(), states)
                self._array_cache[array_id] = cached
            found = cached[1].get(index)
            whole = cached[1].get(-1)
            return whole if found is None and whole is not None and whole.state.terminal \
                else found

    def status(self, job: JobHandle) -> JobStatus:
        array_id, _, index = job.job_id.partition("_")
        if index.isdigit():
            found = self._array_status(array_id, int(index))
            if found is not None:
                return found
        proc = self._slurm("scontrol", "show", "job", "-o", job.job_id)
        if proc.returncode == 0:
            fields = dict(re.findall(r"(?:^|\s)(JobState|ExitCode|Reason)=(\S*)", proc.stdout))
            if "JobState" in fields:
                return _status(fields["JobState"], _exit_code(fields.get("ExitCode", "")),
                               fields.get("Reason", ""))
        elif not any(s in proc.stderr + proc.stdout for s in ("Invalid job id", "not found")):
            raise SlurmError(f"scontrol show job {job.job_id} failed: {proc.stderr.strip()}")
        # The controller no longer holds the job (MinJobAge passed, or it was restarted
        # without its state): the completion log still knows how it ended.
        final = self.completion_status(job)
        if final is None:
            raise SlurmJobUnknown(f"Slurm job {job.job_id} is unknown to the controller and to the "
                             "job completion log (sacct -c); it may belong to another cluster")
        return final

    def completion_status(self, job: JobHandle) -> JobStatus | None:
        """How the job ended according to the job completion log, or None if not there."""
        proc = self._slurm("sacct", "-c", "-n", "-P", "-j", job.job_id,
                           "-o", "jobid,state,exitcode")
        rows = [ln.split("|") for ln in proc.stdout.splitlines() if ln.count("|") == 2]
        rows = [r for r in rows if r[0] == job.job_id]
        if proc.returncode != 0 or not rows:
            return None
        _, state, code = rows[-1]
        return _status(state, _exit_code(code))

    def jobs_named(self, job_name: str, since: datetime | None = None) -> list[str]:
        """The ids of every job called ``job_name`` that Slurm knows: queued, running or
        recently ended (the controller), or ended since ``since`` (the job completion log).

        A caller that gives each submission a unique name (the Slurm work pool names a flow
        run's job after the flow run's id) learns from it whether a submission whose answer
        was lost happened at all.
        """
        proc = self._slurm("squeue", "-h", "-t", "all", f"--name={job_name}", "-o", "%i")
        if proc.returncode != 0:
            raise SlurmError(f"squeue --name={job_name} failed: {proc.stderr.strip()}")
        found = set(proc.stdout.split())
        start = (since or datetime.now() - timedelta(days=1)).astimezone()
        log = self._slurm("sacct", "-c", "-n", "-P", f"--name={job_name}", "-o", "jobid,jobname",
                          "-S", start.strftime("%Y-%m-%dT%H:%M:%S"))
        # sacct exits 1 when the window starts after now (a clock ahead of this host's).
        found |= {row.split("|")[0] for row in log.stdout.splitlines()
                  if row.count("|") == 1 and row.split("|")[1] == job_name}
        return sorted(found, key=lambda j: (len(j), j))

    def interruptions(self, job: JobHandle) -> Interruptions:
        """Requeues the job (or array element) went through and the time its interrupted
        attempts ran, from the attempts record its script keeps (none without requeue)."""
        return read_interruptions(attempts_of(job.stdout))

    def cancel(self, job: JobHandle) -> None:
        """``scancel``, then wait until the job and every one of its processes are gone."""
        proc = self._slurm("scancel", job.job_id)
        if proc.returncode != 0 and "already completing or completed" not in proc.stderr \
                and "Invalid job id" not in proc.stderr:
            raise SlurmError(f"scancel {job.job_id} failed: {proc.stderr.strip()}")
        deadline = time.monotonic() + self.cancel_timeout
        while not self.status(job).state.terminal:
            if time.monotonic() > deadline:
                raise SlurmError(f"Slurm job {job.job_id} is still running "
                                 f"{self.cancel_timeout:.0f} s after scancel; see "
                                 f"`scontrol show job {job.job_id}`")
            time.sleep(0.1)
