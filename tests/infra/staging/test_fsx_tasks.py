"""One data repository task at a time per file system, concurrent requests batched."""

from __future__ import annotations

import threading
import time

import pytest

from infra.staging.fsx import FsxError, TaskResult
from infra.staging.fsx_tasks import MAX_PATHS, TaskQueue


def _result(n: int) -> TaskResult:
    return TaskResult(f"task-{n:017d}", "SUCCEEDED", 1, 1, 0, None, [])


def test_requests_arriving_while_a_task_runs_go_together_in_the_next_one():
    first_started, release = threading.Event(), threading.Event()
    running = []  # how many tasks run at once, seen by each task
    active = threading.Semaphore(1)

    def run(kind, paths):
        assert active.acquire(blocking=False), "two tasks at once on one file system"
        try:
            running.append((kind, paths))
            if len(running) == 1:
                first_started.set()
                assert release.wait(10)
            time.sleep(0.05)
            return _result(len(running))
        finally:
            active.release()

    queue = TaskQueue(run)
    got: dict[str, TaskResult] = {}

    def ask(path: str, kind: str = "EXPORT_TO_REPOSITORY") -> None:
        got[path] = queue.submit(kind, [path])

    threads = [threading.Thread(target=ask, args=("/results/a",))]
    threads[0].start()
    assert first_started.wait(10)
    for p in ("/results/b", "/results/c", "/results/d"):  # wait behind the first task
        threads.append(threading.Thread(target=ask, args=(p,)))
        threads[-1].start()
    threads.append(threading.Thread(target=ask, args=("/inputs/x",
                                                      "IMPORT_METADATA_FROM_REPOSITORY")))
    threads[-1].start()
    time.sleep(0.3)
    release.set()
    for t in threads:
        t.join(10)
    assert queue.tasks[0] == ("EXPORT_TO_REPOSITORY", ["/results/a"])
    assert ("EXPORT_TO_REPOSITORY", ["/results/b", "/results/c", "/results/d"]) in queue.tasks
    assert ("IMPORT_METADATA_FROM_REPOSITORY", ["/inputs/x"]) in queue.tasks
    assert len(queue.tasks) == 3  # not 5: the waiting exports shared one task
    assert got["/results/b"] is got["/results/c"] is got["/results/d"]
    assert got["/results/a"].task_id != got["/results/b"].task_id


def test_a_failed_task_fails_every_request_in_it_and_the_queue_goes_on():
    calls = []

    def run(kind, paths):
        calls.append(paths)
        if len(calls) == 1:
            raise FsxError("EXPORT_TO_REPOSITORY task-1 ended FAILED: 1 of 2 files failed")
        return _result(len(calls))

    queue = TaskQueue(run)
    with pytest.raises(FsxError, match="ended FAILED"):
        queue.submit("EXPORT_TO_REPOSITORY", ["/results/a"])
    assert queue.submit("EXPORT_TO_REPOSITORY", ["/results/b"]).task_id.endswith("2")


def test_a_task_takes_at_most_the_paths_fsx_allows():
    queue = TaskQueue(lambda kind, paths: _result(len(paths)))
    with pytest.raises(ValueError, match=f"1 to {MAX_PATHS} paths"):
        queue.submit("EXPORT_TO_REPOSITORY", [f"/r/{i}" for i in range(MAX_PATHS + 1)])
    with pytest.raises(ValueError):
        queue.submit("EXPORT_TO_REPOSITORY", [])
