"""The error every spec check raises, in a module of its own so checks can live beside the
spec (``flows.resource_checks``) without importing it; and the failed-job error that more than
one way of running a kernel raises (``flows.pipeline``, ``flows.fsx_staging``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class SpecError(ValueError):
    """A pipeline spec that cannot be used; the message names every offending field."""


class MpiJobFailed(RuntimeError):
    """The MPI job exited non-zero; the message carries the failing rank's own error."""


class RanksNeverStarted(Exception):
    """Mixed into a failed-job error whose ranks never started: srun's tasks failed to launch
    (``infra.backends.srun_guard``). Nothing ran, so :func:`retry_condition` runs it once more
    even without retries."""


class KernelNeverStarted(MpiJobFailed, RanksNeverStarted):
    """A single kernel's job whose ranks never started."""


def retry_condition(retries: int) -> Callable[[Any, Any, Any], bool]:
    """Prefect's ``retry_condition_fn`` for a task given ``retries + 1`` retries: the spec's
    ``retries`` for any failure, and one run more when the ranks never started. A job slurmd
    could not start (under load, a PMIx server that did not come up) ran nothing and cost
    nothing; failing a sweep of hours for it is not what users of a scheduler expect."""

    def should_retry(_task: Any, task_run: Any, state: Any) -> bool:
        if isinstance(getattr(state, "data", None), RanksNeverStarted):
            return True  # bounded by the task's retries (retries + 1): one extra run
        return (task_run.run_count or 1) <= retries

    return should_retry
