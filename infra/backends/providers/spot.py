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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFUSED_EXIT = 3


def attempts_file(workdir: Path, job_name: str) -> Path:
    return workdir / f"{job_name}.attempts"


def requeue_guard(path: Path, max_interruptions: int) -> list[str]:
    """Batch-script lines: record this attempt, stop past ``max_interruptions`` requeues."""
    from infra.backends.shell_safety import render_command

    quoted = render_command([str(path)])
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


def read_interruptions(path: Path) -> Interruptions:
    """What ``requeue_guard`` recorded; no file (never started) is no interruption."""
    try:
        rows = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return Interruptions(0, 0.0)
    starts = sorted(float(r[1]) for r in rows if len(r) == 2)
    lost = sum(b - a for a, b in zip(starts, starts[1:], strict=False))
    return Interruptions(max(0, len(starts) - 1), lost)


def batch_retry_strategy(max_interruptions: int) -> dict[str, Any]:
    """Batch ``retryStrategy``: retry a Spot reclaim up to ``max_interruptions`` times only."""
    return {
        "attempts": max_interruptions + 1,
        "evaluateOnExit": [
            {"onStatusReason": "Host EC2*", "action": "RETRY"},
            {"onReason": "*", "action": "EXIT"},
        ],
    }
