"""Spot interruptions: a reclaimed node's job is requeued and resumes; bounded and reported.

On Slurm (ParallelCluster's Spot queues, or any cluster whose nodes can vanish) a job
submitted with ``--requeue`` goes back to the queue when its node is lost, and Slurm runs the
same batch script again with ``SLURM_RESTART_COUNT`` set to the number of requeues. The script
clusterflow writes therefore:

- records each attempt's start in ``<job>.attempts`` (so the summary can say how many times the
  job was interrupted and how long the interrupted attempts ran: compute paid for and lost,
  apart from what their checkpoints kept);
- refuses to run past ``max_interruptions`` requeues (exit 3 with a message), so a reclaim
  storm cannot keep spending: Slurm's own ``MaxBatchRequeue`` is cluster-wide, this is per run;
- is given a kernel command with ``--restart``, which resumes from the newest complete
  checkpoint (or starts at step 0 when there is none), so the answer is the uninterrupted one.

Output files are opened in append mode (``--open-mode=append``): Slurm truncates them on a
requeue otherwise, and the pipeline's log forwarding reads them by offset.

On Batch the same bound is the job definition's ``retryStrategy``: ``attempts`` of
``max_interruptions + 1`` with ``evaluateOnExit`` retrying only when the status reason is a
Spot reclaim (``Host EC2*``, what Batch reports when the instance went away) and exiting
otherwise, so a failing program is not retried as if it had been interrupted.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

REFUSED_EXIT = 3
# Batch's status reason when an attempt's instance went away ("Host EC2 (instance i-...)
# terminated."): a Spot reclaim, or any loss of the host.
SPOT_REASON = "Host EC2*"


def attempts_file(workdir: Path, job_name: str) -> Path:
    return workdir / f"{job_name}.attempts"


def attempts_of(stdout: Path) -> Path:
    """A job's attempts record sits next to its stdout: ``<job>.out`` -> ``<job>.attempts``
    for a single job, ``logs/<index>.out`` -> ``logs/<index>.attempts`` for an array element."""
    return stdout.with_suffix(".attempts")


def requeue_guard(path: PurePath | str, max_interruptions: int, *, array_dir: bool = False,
                  array_stem: bool = False) -> list[str]:
    """Batch-script lines: record this attempt, stop past ``max_interruptions`` requeues.

    With ``array_dir`` the record is ``<path>/<SLURM_ARRAY_TASK_ID>.attempts`` (with
    ``array_stem``: ``<path><SLURM_ARRAY_TASK_ID>.attempts``): Slurm keeps
    ``SLURM_RESTART_COUNT`` per array task (a requeued element becomes a job record of its
    own), so each sweep point is bounded and reported on its own.
    """
    from infra.backends.shell_safety import render_command

    quoted = render_command([str(path)])
    if array_dir:
        quoted += '/"${SLURM_ARRAY_TASK_ID}.attempts"'
    elif array_stem:
        quoted += '"${SLURM_ARRAY_TASK_ID}.attempts"'
    return [
        'n="${SLURM_RESTART_COUNT:-0}"',
        f'echo "$n $(date +%s.%N)" >> {quoted}',
        f'if [ "$n" -gt {int(max_interruptions)} ]; then',
        f'  echo "clusterflow: the job was interrupted $n times, past max_interruptions='
        f'{int(max_interruptions)}; not resuming" >&2',
        f"  exit {REFUSED_EXIT}",
        "fi",
    ]


@dataclass(frozen=True)
class Interruptions:
    count: int  # requeues the job went through
    seconds_lost: float  # time from each interrupted attempt's start to the next one's

    def as_dict(self) -> dict[str, Any]:
        return {"interruptions": self.count, "seconds_lost": round(self.seconds_lost, 3)}


def parse_attempts(text: str) -> Interruptions:
    """The attempts record's text: one ``<restart count> <epoch seconds>`` line per start."""
    rows = [ln.split() for ln in text.splitlines() if ln.strip()]
    starts = sorted(float(r[1]) for r in rows if len(r) == 2)
    lost = sum(b - a for a, b in zip(starts, starts[1:], strict=False))
    return Interruptions(max(0, len(starts) - 1), lost)


def read_interruptions(path: Path) -> Interruptions:
    """What ``requeue_guard`` recorded; no file (never started) is no interruption."""
    try:
        return parse_attempts(path.read_text())
    except FileNotFoundError:
        return Interruptions(0, 0.0)


def batch_interruptions(job: dict[str, Any]) -> Interruptions:
    """A Batch job's interruptions from its ``attempts``: every attempt that ended because
    its instance went away (``Host EC2*``, the reason the retry strategy retries), and the
    time those attempts ran (``startedAt`` to ``stoppedAt``, milliseconds)."""
    lost = [a for a in job.get("attempts", [])
            if fnmatch.fnmatchcase(str(a.get("statusReason", "")), SPOT_REASON)]
    seconds = sum(max(0, int(a.get("stoppedAt") or 0) - int(a.get("startedAt") or 0))
                  for a in lost if a.get("startedAt")) / 1000
    return Interruptions(len(lost), seconds)


def batch_retry_strategy(max_interruptions: int) -> dict[str, Any]:
    """Batch ``retryStrategy``: retry a Spot reclaim up to ``max_interruptions`` times only."""
    return {
        "attempts": max_interruptions + 1,
        "evaluateOnExit": [
            {"onStatusReason": SPOT_REASON, "action": "RETRY"},
            {"onReason": "*", "action": "EXIT"},
        ],
    }


def job_interruptions(provider: Any, job: Any) -> dict[str, Any] | None:
    """``{"interruptions": N, "seconds_lost": S}`` for a job whose provider keeps count
    (Slurm with requeue, ParallelCluster on a Spot queue, Batch's attempts); None otherwise."""
    read = getattr(provider, "interruptions", None)
    if read is None:
        return None
    try:
        return dict(read(job).as_dict())
    except Exception:  # noqa: BLE001 - a count that cannot be read must not fail a finished job
        return None
