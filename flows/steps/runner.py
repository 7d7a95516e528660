"""Scheduling the step graph as Prefect task runs: one per point, concurrent where it may be.

A point starts once every point it reads from has finished, at most ``max_parallel`` points of
one sweep at a time; a point whose upstream failed is skipped, and with ``fail_fast`` the
first failure cancels its siblings. On Slurm and on parallelcluster, the points of a sweep go to
the scheduler as one job array
(``sbatch --array=...%max_parallel``), while each point stays its own task run.
With ``reuse_result`` a point whose step, parameters and input bytes are unchanged is a
Prefect cache hit: its earlier outputs are fetched and verified instead of being recomputed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import threading
from collections import Counter
from typing import Any

from botocore.exceptions import ClientError
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows.errors import retry_condition
from flows.steps.execute import PointFailed, StepRun, execute_point, reuse_point
from flows.steps.graph import Point
from flows.steps.inputs import InputError
from flows.steps.model import StepSpec
from infra.backends.providers.allocation import current_allocation
from infra.backends.providers.base import JobHandle
from infra.staging.objects import IntegrityError

DONE_OK = ("completed", "reused")


def point_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """What a point's outputs depend on: the step's program, its parameters, its launcher,
    its input bytes and where results live. Ranks count only for user commands: the bundled
    kernels give the same bits for any rank count."""
    run: StepRun = parameters["run"]
    point: Point = parameters["point"]
    step = run.plan.steps[point.step]
    launcher = step.launcher if isinstance(step.launcher, str | None) else \
        step.launcher.model_dump()
    identity = {
        "uses": step.uses, "command": step.command, "env": step.env, "params": point.params,
        "launcher": launcher, "outputs": step.outputs, "inputs": parameters["identity"],
        "ranks": None if step.uses else run.plan.ranks(step, run.spec.ranks),
        "results": [run.spec.storage.results_bucket, run.spec.storage.results_prefix],
    }
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return "clusterflow-step-" + hashlib.sha256(blob).hexdigest()


@task(name="step", result_serializer="json")
def point_task(run: StepRun, point: Point, identity: dict[str, Any]) -> dict[str, Any]:
    """One point of one step (see flows.steps.execute.execute_point)."""
    return execute_point(run, point, identity)


@task(name="reuse", cache_policy=NO_CACHE)
def reuse_task(run: StepRun, point: Point, earlier: dict[str, Any]) -> dict[str, Any]:
    """Fetch and verify an earlier run's outputs for this point and publish them here."""
    return reuse_point(run, point, earlier)


class ArrayBatch:
    """The points of one swept step on Slurm, collected and submitted as ONE job array.

    Each point's task registers its command and blocks; once every point of the step has
    either registered or finished without needing a job (a cache hit, an input error), the
    scheduler submits the array and hands every waiting point its element.
    """

    def __init__(self, run: StepRun, step: StepSpec, provider: Any, ranks: int) -> None:
        self.run, self.step, self.provider, self.ranks = run, step, provider, ranks
        self.items: dict[int, Any] = {}
        self.handles: dict[int, JobHandle] | None = None
        self.error: Exception | None = None
        self.cond = threading.Condition()

    def register(self, point: Point, command: list[str], work: Any,
                 env: dict[str, str]) -> JobHandle | None:
        """This point's array element; None once the array has gone without it (a retry,
        or a recompute after a failed reuse): the caller submits it on its own."""
        from infra.backends.providers.base import ArrayItem

        with self.cond:
            if self.handles is not None or self.error is not None:
                return None
            self.items[point.index] = ArrayItem(point.index, command, work, env)
            self.cond.notify_all()
            while self.handles is None and self.error is None:
                if self.step.name in self.run.cancelled:
                    raise PointFailed(f"{point.task_name} cancelled before its array started")
                self.cond.wait(0.5)
            if self.error is not None:
                raise PointFailed(f"{point.task_name}: the job array was refused: {self.error}")
            return self.handles[point.index]

    def maybe_submit(self, finished_without_job: int, expected: int) -> None:
        with self.cond:
            if self.handles is not None or self.error is not None:
                return
            if len(self.items) + finished_without_job < expected:
                return
            items = [self.items[i] for i in sorted(self.items)]
            try:
                # On parallelcluster the scripts and logs go in <remote_root>/<run dir name>/
                # (a point's own folder name may hold '=' and ','), as its single jobs' do.
                pc = self.run.backend_of(self.step) == "parallelcluster"
                handles = self.provider.submit_array(
                    items, ranks=self.ranks, job_name=self.step.name,
                    workdir=self.run.run_dir if pc else self.run.run_dir / self.step.name,
                    max_parallel=self.step.sweep.max_parallel if self.step.sweep else 1)
                self.handles = {i.index: h for i, h in zip(items, handles, strict=True)}
                if items:
                    self.run.logger.info("%s: %d point(s) submitted as Slurm job array %s",
                                         self.step.name, len(items),
                                         handles[0].job_id.split("_")[0])
            except Exception as e:  # noqa: BLE001 - every waiting point reports it
                self.error = e
            self.cond.notify_all()


# Every point of an array waits in its own task-runner thread until the array is submitted,
# so an array may not have more points than the flow's pool has threads to spare (256);
# a larger sweep goes to Slurm as one sbatch per point, max_parallel at a time.
ARRAY_MAX_POINTS = 200


def _uses_array(run: StepRun, step: StepSpec) -> bool:
    # Inside an allocation (a flow run of the Slurm pool) points are srun steps, not arrays.
    # On parallelcluster the array goes to the head node, on the shared mount or staged
    # through FSx (each element's command carries its own hand-over, flows.steps.fsx).
    return (run.backend_of(step) in ("slurm", "parallelcluster") and step.sweep is not None
            and not step.per_point
            and 1 < len(run.plan.points[step.name]) <= ARRAY_MAX_POINTS
            and current_allocation() is None)


def _point_summary(point: Point, **fields: Any) -> dict[str, Any]:
    return {"step": point.step, "label": point.label, "params": point.params, **fields}


class GraphScheduler:
    """Walks the plan: submits ready points, collects finished ones, until nothing is left."""

    def __init__(self, run: StepRun, *, reuse: bool) -> None:
        self.run, self.reuse = run, reuse
        self.results: dict[tuple[str, str], dict[str, Any]] = {}
        self.running: dict[tuple[str, str], tuple[Any, Point, str]] = {}
        self.active: Counter[str] = Counter()
        self.submitted: Counter[str] = Counter()
        self.without_job: Counter[str] = Counter()  # array points that finished unregistered

    def _task(self, point: Point, **options: Any) -> Any:
        step = self.run.plan.steps[point.step]
        if self.reuse:
            options |= {"cache_key_fn": point_cache_key, "persist_result": True}
        else:
            options |= {"cache_policy": NO_CACHE, "persist_result": False}
        # One run more than the spec's retries, spent only when the ranks never started.
        return point_task.with_options(task_run_name=point.task_name,
                                       retries=step.retries + 1,
                                       retry_condition_fn=retry_condition(step.retries),
                                       **options)

    def _finish(self, point: Point, result: dict[str, Any]) -> None:
        self.results[point.key] = result
        if result["state"] in DONE_OK:
            self.run.records[point.key] = result
        self._event(point, "succeeded" if result["state"] in DONE_OK else result["state"],
                    result)
        step = self.run.plan.steps[point.step]
        if result["state"] == "failed" and step.sweep is not None and step.sweep.fail_fast:
            self.run.cancelled.add(step.name)

    def _event(self, point: Point, stage: str, detail: dict[str, Any] | None = None) -> None:
        if self.run.events is not None:
            keep = {k: (detail or {}).get(k) for k in ("state", "job_id", "seconds", "error")}
            self.run.events(point, stage, {k: v for k, v in keep.items() if v is not None})

    def _failed(self, point: Point, error: str) -> dict[str, Any]:
        attempt = self.run.attempts.get(point.key, {})
        extra = {"spot": attempt["spot"]} if "spot" in attempt else {}
        return _point_summary(point, state="failed", error=error,
                              backend=attempt.get("backend"), job_id=attempt.get("job_id"),
                              seconds=attempt.get("seconds"), files=[], **extra)

    def _start(self, point: Point) -> None:
        run = self.run
        step = run.plan.steps[point.step]
        if _uses_array(run, step) and step.name not in run.arrays:
            run.arrays[step.name] = ArrayBatch(run, step, run.backends.get(run.backend_of(step)),
                                               run.plan.ranks(step, run.spec.ranks))
        try:
            identity = run.identity(point)
        except InputError as e:
            self._finish(point, self._failed(point, f"{point.task_name}: {e}"))
            return
        self._event(point, "started")
        future = self._task(point).submit(run, point, identity)
        self.running[point.key] = (future, point, "run")
        self.active[point.step] += 1
        self.submitted[point.step] += 1

    def _ready(self, point: Point) -> bool | None:
        """True: start it; None: skip it (an upstream failed or its step was cancelled)."""
        step = self.run.plan.steps[point.step]
        ups = [self.results.get(k) for k in point.upstream]
        if step.name in self.run.cancelled or any(
                u is not None and u["state"] not in DONE_OK for u in ups):
            return None
        if any(u is None for u in ups):
            return False
        if step.name in self.run.arrays or _uses_array(self.run, step):
            return True  # Slurm keeps the array to max_parallel
        limit = step.sweep.max_parallel if step.sweep else 1 << 30
        return self.active[step.name] < limit

    def _collect(self, key: tuple[str, str]) -> None:
        future, point, kind = self.running.pop(key)
        future.wait()  # done already: this records the final state without asking the API
        state = future.state
        if kind == "run":
            self.active[point.step] -= 1
            batch = self.run.arrays.get(point.step)
            if batch is not None and point.index not in batch.items:
                self.without_job[point.step] += 1
        if state.is_completed():
            record = future.result()
            if record["computed_by"] != self.run.run_id and kind == "run":
                self.run.logger.info("%s: reusing the outputs of run %s", point.task_name,
                                     record["computed_by"])
                reuse = reuse_task.with_options(task_run_name=f"reuse {point.task_name}")
                self.running[key] = (reuse.submit(self.run, point, record), point, "reuse")
                return
            self._finish(point, record)
            return
        error = future.result(raise_on_failure=False)
        if kind == "reuse" and isinstance(error, ClientError | IntegrityError):
            self.run.logger.warning("%s: cannot reuse (%s); computing again", point.task_name,
                                    error)
            fresh = self._task(point, refresh_cache=True).submit(
                self.run, point, self.run.identity(point))
            self.running[key] = (fresh, point, "run")
            self.active[point.step] += 1
            return
        message = str(error) if isinstance(error, BaseException) else state.message
        self._finish(point, self._failed(point, message or "failed"))

    def run_all(self) -> dict[tuple[str, str], dict[str, Any]]:
        pending = self.run.plan.all_points()
        while pending or self.running:
            for point in list(pending):
                ready = self._ready(point)
                if ready is None:
                    pending.remove(point)
                    why = ("cancelled (fail_fast)" if point.step in self.run.cancelled
                           else "skipped: an upstream point failed")
                    self._finish(point, _point_summary(point, state="skipped", error=why,
                                                       files=[]))
                elif ready:
                    pending.remove(point)
                    self._start(point)
            for name, batch in self.run.arrays.items():
                batch.maybe_submit(self.without_job[name], self.submitted[name])
            if self.running:
                concurrent.futures.wait([f.wrapped_future for f, _, _ in self.running.values()],
                                        timeout=0.1,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            for key in [k for k, (f, _, _) in self.running.items() if f.wrapped_future.done()]:
                self._collect(key)
        return self.results
