"""The budget's pieces that the spec and the backends need: the model and the watchdog.

Kept apart from ``flows.budget`` (which prices the run through ``flows.planning``) so that the
spec and ``flows.backends`` can import them without importing the planner.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict, Field

from infra.backends.shell_safety import NoControlChars

if TYPE_CHECKING:
    from infra.backends.providers.base import ExecutionProvider, Job


class Budget(NoControlChars):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_usd: float = Field(gt=0, description="refuse or stop the run past this many USD")
    hourly_usd: float | None = Field(
        None, ge=0, description="price the whole run at this rate (USD per hour of wall time) "
        "instead of the price table: for a backend without an AWS price, or your own rate")
    prices: Path | None = Field(None, description="price table instead of the shipped one")
    live_prices: bool = Field(False, description="price instances with AWS's current "
                              "On-Demand (Price List API) and Spot prices, falling back to "
                              "the table (needs AWS credentials)")
    check_seconds: float = Field(30.0, gt=0, le=3600,
                                 description="how often the watchdog compares spend to max_usd")


class BudgetExceeded(RuntimeError):
    """The run's estimate, or its spend so far, is past ``budget.max_usd``."""


class _Guarded:
    """A provider whose jobs the watchdog can cancel (and which submits none once tripped)."""

    def __init__(self, inner: ExecutionProvider, dog: Watchdog) -> None:
        self._inner, self._dog = inner, dog

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def submit(self, *args: Any, **kwargs: Any) -> Job:
        if self._dog.tripped:
            raise BudgetExceeded(self._dog.message)
        job = self._inner.submit(*args, **kwargs)
        self._dog.jobs.append((self._inner, job))
        return job

    def submit_array(self, *args: Any, **kwargs: Any) -> list[Job]:
        """A sweep's Slurm job array: every element is cancelled with the run's other jobs."""
        if self._dog.tripped:
            raise BudgetExceeded(self._dog.message)
        jobs = self._inner.submit_array(*args, **kwargs)  # type: ignore[attr-defined]
        self._dog.jobs.extend((self._inner, job) for job in jobs)
        return list(jobs)


class Watchdog:
    """Elapsed x rate against ``max_usd``, checked every ``interval`` seconds in a thread."""

    def __init__(self, max_usd: float, usd_per_hour: float, *, interval: float,
                 teardown: list[Callable[[], Any]] | None = None,
                 log: Callable[[str], None] = lambda _: None) -> None:
        self.max_usd, self.usd_per_hour, self.interval = max_usd, usd_per_hour, interval
        self.teardown = list(teardown or [])
        self.log = log
        self.jobs: list[tuple[ExecutionProvider, Job]] = []
        self.tripped = False
        self.message = ""
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="budget-watchdog", daemon=True)

    def spent(self) -> float:
        return (time.monotonic() - self.started) / 3600 * self.usd_per_hour

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.spent() > self.max_usd:
                self.trip()
                return

    def trip(self) -> None:
        hours = (time.monotonic() - self.started) / 3600
        self.message = (f"budget exceeded: {hours * 3600:.0f} s x {self.usd_per_hour:g} USD/h "
                        f"= {self.spent():.4f} USD passed budget.max_usd ({self.max_usd:g} "
                        "USD); the run's jobs were cancelled" + (
                            " and its cluster/environment torn down" if self.teardown else ""))
        self.tripped = True
        self.log(self.message)
        for provider, job in list(self.jobs):
            with contextlib.suppress(Exception):  # a job that already ended
                provider.cancel(job)
        for teardown in self.teardown:
            try:
                teardown()
            except Exception as e:  # said, not hidden: a cluster may still be running
                self.log(f"budget teardown failed: {type(e).__name__}: {e}")
                self.message += f" (teardown failed: {e}; delete it yourself)"


_active: contextvars.ContextVar[Watchdog | None] = contextvars.ContextVar(
    "clusterflow_budget_watchdog", default=None)


def guard(provider: ExecutionProvider) -> ExecutionProvider:
    """``provider`` with its jobs known to the run's watchdog (as is without a budget)."""
    dog = _active.get()
    return provider if dog is None else _Guarded(provider, dog)  # type: ignore[return-value]
