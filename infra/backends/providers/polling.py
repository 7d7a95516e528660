"""Waiting for a job: status polls with capped exponential backoff, for any provider.

A scheduler is a shared service: polling it every 100 ms for an hour-long job is 36,000 RPCs
for nothing. The interval starts short (a job that ends at once is seen at once), grows to a
cap, and drops back to the start whenever the state changes, so the end of a job that just
started running is still noticed quickly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from infra.backends.providers.base import ExecutionProvider, JobHandle, JobStatus


class ProviderUnavailable(RuntimeError):
    """The scheduler does not answer right now (it may again: a controller restart, a
    failover); the message says what to do if it stays that way."""


@dataclass(frozen=True)
class Backoff:
    first: float = 0.1
    factor: float = 1.5
    cap: float = 1.0

    def delays(self) -> Iterator[float]:
        delay = self.first
        while True:
            yield delay
            delay = min(delay * self.factor, self.cap)


def wait(provider: ExecutionProvider, job: JobHandle, *, timeout: float | None = None,
         backoff: Backoff | None = None,
         on_poll: Callable[[JobStatus], None] | None = None,
         unavailable_grace: float = 60.0) -> JobStatus:
    """Poll ``provider.status(job)`` until the job is terminal; return that status.

    ``on_poll`` runs after every poll (forward new log lines there); it also runs once on the
    terminal status, so nothing written at the very end is missed. A scheduler that does not
    answer (`ProviderUnavailable`) is retried for ``unavailable_grace`` seconds in a row before
    the error is raised. On ``timeout`` a ``TimeoutError`` is raised and the job is left alone:
    the caller decides whether to cancel it.
    """
    backoff = backoff or Backoff()
    start = time.monotonic()
    unavailable_since: float | None = None
    delays = backoff.delays()
    last_state = None
    while True:
        try:
            status = provider.status(job)
            unavailable_since = None
        except ProviderUnavailable:
            now = time.monotonic()
            unavailable_since = unavailable_since or now
            if now - unavailable_since >= unavailable_grace:
                raise
            status = None
        if status is not None:
            if on_poll is not None:
                on_poll(status)
            if status.state.terminal:
                return status
            if status.state != last_state:
                last_state = status.state
                delays = backoff.delays()
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(
                f"job {job.job_id} on {provider.label} did not finish within {timeout:.0f} s "
                f"(last state: {last_state.value if last_state else 'unknown'}); it was left "
                f"running")
        provider.pause(job, next(delays))
