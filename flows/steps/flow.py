"""The steps part of a pipeline run: plan, run every point, and write the run's manifest.

Called from inside the ``hpc-pipeline`` flow between provision and fan-out, so a multi-step
run has the same shape in the Prefect UI and the same "results ready" event as a one-kernel
run: the run's ``manifest.json`` lists every step and point, and every published file
relative to ``<prefix><run-id>/`` with its sha256 (the consumers verify exactly those).
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.backends import BackendSession
from flows.fsx_checks import uses_fsx
from flows.spec import PipelineSpec, step_plan
from flows.steps.execute import StepRun
from flows.steps.graph import Point
from flows.steps.runner import DONE_OK, GraphScheduler
from infra.aws.clients import AwsTarget

RUN_EVENTS_TOPIC = "clusterflow-run-events.fifo"


class PipelineFailed(RuntimeError):
    """Some step or point failed; ``summary`` still describes every point of the run."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class StepsOutcome:
    manifest: dict[str, Any]
    points: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [p for p in self.points if p["state"] not in DONE_OK]


class RunEventsPublisher:
    """Per-point lifecycle events on the fabric's FIFO run-events topic (ordered per run).

    Published by one background thread, in the order they happen: the topic lookup (a
    ListTopics walk) and one SNS publish per point and stage stay off the path between one
    job ending and the next starting. ``close`` waits for the last one and raises the first
    failure, so a run never ends with its events silently lost.
    """

    def __init__(self, aws: AwsTarget, run_id: str) -> None:
        self.aws, self.run_id = aws, run_id
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="clusterflow-run-events",
                                        daemon=True)
        self._thread.start()

    def __call__(self, point: Point, stage: str, detail: dict[str, Any]) -> None:
        self._queue.put((f"step:{point.task_name}:{stage}",
                         {"step": point.step, "point": point.label, "state": stage, **detail}))

    def close(self, *, raise_error: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and raise_error:
            raise RuntimeError(f"could not publish the run's events to {RUN_EVENTS_TOPIC}: "
                               f"{self._error}") from self._error

    def _topic(self) -> str:
        from event_bridge.ensure_topics import find_topic

        sns = self.aws.client("sns")
        return find_topic(sns, RUN_EVENTS_TOPIC) or sns.create_topic(
            Name=RUN_EVENTS_TOPIC, Attributes={"FifoTopic": "true"})["TopicArn"]

    def _loop(self) -> None:
        from event_bridge.run_events import publish_run_event

        arn: str | None = None
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: the first failure is what close() reports
            try:
                arn = arn or self._topic()
                publish_run_event(self.aws, arn, self.run_id, *item)
            except Exception as e:  # noqa: BLE001 - reported by close()
                self._error = e


def point_view(result: dict[str, Any]) -> dict[str, Any]:
    """A point as the summary and the manifest show it."""
    keys = ("state", "backend", "job_id", "ranks", "seconds", "computed_by", "error", "spot")
    view = {"point": result["label"], "params": result["params"],
            **{k: result.get(k) for k in keys if result.get(k) is not None}}
    view["outputs"] = [{"name": f["name"], "sha256": f["sha256"], "bytes": f["bytes"]}
                       for f in result.get("files", [])]
    return view


def open_fsx(spec: PipelineSpec, plan: Any, aws: AwsTarget, run_id: str, run_dir: Path,
             backends: BackendSession, logger: Any, fsx_client: Any = None) -> Any:
    """A run staged through the cluster's FSx (``flows.steps.fsx``): every input on its
    file system before the first step."""
    from flows.steps.fsx import StepsFsx

    fsx = StepsFsx.open(spec, plan, aws, run_id, run_dir, backends.get("parallelcluster"),
                        logger, fsx_client)
    count = fsx.stage_inputs(run_dir)
    logger.info("%d input object(s) on the cluster's file system", count)
    return fsx


def run_steps(spec: PipelineSpec, spec_path: Path, aws: AwsTarget, run_id: str,
              run_dir: Path, logger: Any, timed: Any = None) -> StepsOutcome:
    plan = step_plan(spec, spec_path)
    timed = timed or (lambda _name, fn, *args: fn(*args))
    with BackendSession(spec, aws, logger) as backends:
        fsx = None
        if uses_fsx(spec):  # run from anywhere: only the ranks see the cluster's FSx
            timed("cluster", backends.get, "parallelcluster")
            fsx = timed("stage_in_fsx", open_fsx, spec, plan, aws, run_id, run_dir, backends,
                        logger)
        events = RunEventsPublisher(aws, run_id)
        run = StepRun(spec=spec, plan=plan, aws=aws, run_id=run_id, run_dir=run_dir,
                      backends=backends, logger=logger, events=events, fsx=fsx)
        try:
            results = GraphScheduler(run, reuse=spec.reuse_result).run_all()
        except BaseException:
            events.close(raise_error=False)
            raise
        events.close()
    ordered = [results[p.key] for p in plan.all_points()]
    files = []
    for r in ordered:
        if r["state"] in DONE_OK:
            base = f"{r['step']}/{r['label']}/" if r["label"] else f"{r['step']}/"
            files += [{"name": base + f["name"], "sha256": f["sha256"], "bytes": f["bytes"]}
                      for f in r["files"]]
    steps: dict[str, Any] = {}
    for name, step in plan.steps.items():
        points = [point_view(r) for r in ordered if r["step"] == name]
        steps[name] = {"uses": step.uses, "command": step.command,
                       "backend": step.backend or spec.backend, "points": points}
    state = "succeeded" if all(r["state"] in DONE_OK for r in ordered) else "failed"
    manifest = {"run_id": run_id, "spec": spec.name, "state": state, "files": files,
                "steps": steps}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return StepsOutcome(manifest=manifest, points=ordered)
