"""A run's data repository tasks, one at a time per file system, waiting requests batched.

FSx runs one data repository task per file system at a time and refuses a second one while
it runs (``DataRepositoryTaskExecuting``). A sweep's points finish concurrently and each one
exports its own folder, so the tasks of a run go through one queue: whoever finds the queue
idle starts a task for every request of the same type waiting at that moment (up to the
100 paths a task takes) and hands the result to all of them; requests that arrive while it
runs wait and go together in the next task. A 64-point sweep finishing together is then a
few export tasks, not 64 queued one behind another.

A task that fails fails every request in it with the same one-line message (it names the
failure report and the failing paths); a request's own paths are still verified in S3 by
its caller, so no request is believed on the task's word alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from infra.staging.fsx import TaskResult, TaskType

MAX_PATHS = 100  # CreateDataRepositoryTask's Paths (the FSx service model's max)

Runner = Callable[[TaskType, list[str]], TaskResult]  # (type, paths) -> the ended task


@dataclass
class _Request:
    kind: TaskType
    paths: list[str]
    result: TaskResult | None = None
    error: BaseException | None = None
    done: bool = False


class TaskQueue:
    """Serialises and batches one file system's data repository tasks (thread-safe)."""

    def __init__(self, run: Runner) -> None:
        self._run = run
        self._cond = threading.Condition()
        self._waiting: list[_Request] = []
        self._busy = False
        self.tasks: list[tuple[TaskType, list[str]]] = []  # what was started, in order

    def submit(self, kind: TaskType, paths: Sequence[str]) -> TaskResult:
        """Run ``paths`` in a task of type ``kind`` (perhaps with others) and wait for it."""
        if not 0 < len(paths) <= MAX_PATHS:
            raise ValueError(f"a data repository task takes 1 to {MAX_PATHS} paths, "
                             f"not {len(paths)}")
        mine = _Request(kind, list(paths))
        with self._cond:
            self._waiting.append(mine)
            while not mine.done:
                if self._busy:
                    self._cond.wait()
                    continue
                batch = self._take()
                self._busy = True
                self._cond.release()
                try:
                    self._execute(batch)
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    def _take(self) -> list[_Request]:
        """The first waiting request and every later one of its type that still fits."""
        kind, batch, count = self._waiting[0].kind, [], 0
        for r in list(self._waiting):
            if r.kind == kind and count + len(r.paths) <= MAX_PATHS:
                batch.append(r)
                count += len(r.paths)
                self._waiting.remove(r)
        return batch

    def _execute(self, batch: list[_Request]) -> None:
        paths = list(dict.fromkeys(p for r in batch for p in r.paths))
        self.tasks.append((batch[0].kind, paths))
        try:
            result, error = self._run(batch[0].kind, paths), None
        except BaseException as e:  # noqa: BLE001 - handed to every request of the batch
            result, error = None, e
        for r in batch:
            r.result, r.error, r.done = result, error, True
