"""The local provider hears its job end instead of finding out a poll later."""

from __future__ import annotations

import time
from pathlib import Path

from infra.backends.providers.base import JobState
from infra.backends.providers.local import LocalProvider
from infra.backends.providers.polling import Backoff, wait


def test_pause_returns_when_the_job_exits(tmp_path: Path) -> None:
    provider = LocalProvider()
    job = provider.submit(["sleep", "0.3"], ranks=1, job_name="j", workdir=tmp_path)
    t0 = time.monotonic()
    provider.pause(job, 120)  # a 120 s pause, cut short by the exit
    assert time.monotonic() - t0 < 60
    assert provider.status(job).state is JobState.COMPLETED


def test_pause_waits_its_time_while_the_job_runs(tmp_path: Path) -> None:
    provider = LocalProvider()
    job = provider.submit(["sleep", "30"], ranks=1, job_name="j", workdir=tmp_path)
    try:
        t0 = time.monotonic()
        provider.pause(job, 0.2)
        assert time.monotonic() - t0 >= 0.2
        assert provider.status(job).state is JobState.RUNNING
    finally:
        provider.cancel(job)
    assert provider.status(job).state is JobState.CANCELLED


def test_wait_with_a_long_backoff_still_sees_a_short_job_end(tmp_path: Path) -> None:
    provider = LocalProvider()
    job = provider.submit(["sh", "-c", "exit 3"], ranks=1, job_name="j", workdir=tmp_path)
    t0 = time.monotonic()
    status = wait(provider, job, backoff=Backoff(first=120, cap=120))
    assert time.monotonic() - t0 < 60  # not the 120 s a blind sleep would take
    assert status.state is JobState.FAILED and status.exit_code == 3
