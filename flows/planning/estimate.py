"""The run's compute and storage, priced: instance type x count x hours per step.

Hours come from the limits the spec already sets, never from a guess: a step's ``timeout``
(seconds), else the backend's own limit (``slurm.time_limit`` for slurm and parallelcluster,
the Batch config's ``timeout_minutes``). A job cannot outlive its limit, so the estimate is an
upper bound, and with no limit the cost is unknown (and a ``budget:`` refuses the run, since
nothing would bound it).

Upper-bound rules, each stated in the estimate's assumptions:

- a sweep runs ``max_parallel`` points at a time, so its wall time is
  ``ceil(points / max_parallel) x hours``; every point is billed its full hours;
- steps are taken one after another (the wall time of the run is their sum);
- a ParallelCluster queue with several compute resources is priced at its dearest (Slurm may
  place the job on any of them); nodes per job are ``ceil(ranks / CPUs)`` with CPUs the
  instance's vCPUs (or cores with ``DisableSimultaneousMultithreading``);
- the head node and the storage the cluster creates (FSx for Lustre, EBS) are billed for the
  run's wall time plus ``SETUP_HOURS`` for creating the cluster;
- Batch nodes are ``ceil(ranks / ranks_per_node)`` (Batch's own sizing), and the compute
  environment scales to 0 vCPUs, so nothing is billed between jobs.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.steps.graph import Plan
from flows.steps.model import StepSpec
from infra.clusters.prices import PriceError, PriceTable

if TYPE_CHECKING:
    from flows.spec import PipelineSpec

SETUP_HOURS = 0.25  # creating a cluster: head node and file system bill from then
_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_hours(value: str) -> float:
    """Slurm's --time formats in hours: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _SLURM_TIME.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a Slurm time")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return int(days) * 24 + h + mi / 60 + s / 3600
    if c is not None:  # H:M:S
        return int(a) + int(b) / 60 + int(c) / 3600
    if b is not None:  # M:S
        return int(a) / 60 + int(b) / 3600
    return int(a) / 60  # M


@dataclass
class Line:
    """One priced item: a step's jobs, the head node, or a file system / volume."""

    item: str
    kind: str  # compute | head_node | storage
    backend: str
    instance_type: str | None = None
    nodes: int = 0
    points: int = 1
    parallel: int = 1
    hours: float | None = None  # per point (compute) or billed hours (head node, storage)
    wall_hours: float | None = None
    usd_per_hour: float = 0.0  # per node-hour (compute), per hour (head node, storage)
    pricing: str = ""
    usd: float | None = None
    usd_on_demand: float | None = None

    def finish(self, on_demand_rate: float | None = None) -> Line:
        units = self.points * self.nodes if self.kind == "compute" else 1
        if self.hours is not None:
            self.usd = round(units * self.hours * self.usd_per_hour, 4)
            od = self.usd_per_hour if on_demand_rate is None else on_demand_rate
            self.usd_on_demand = round(units * self.hours * od, 4)
        return self


@dataclass
class Estimate:
    lines: list[Line] = field(default_factory=list)
    wall_hours: float | None = 0.0
    usd: float | None = 0.0
    usd_on_demand: float | None = 0.0
    usd_per_hour: float = 0.0  # the most the run burns per hour (the watchdog's rate)
    assumptions: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # why the cost has no upper bound
    unpriced: list[str] = field(default_factory=list)  # what the price table lacks
    prices_as_of: str = ""
    prices_source: str = ""
    price_notes: list[str] = field(default_factory=list)  # live prices: what came from where

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _step_hours(spec: PipelineSpec, step: StepSpec, backend: str) -> tuple[float | None, str]:
    if step.timeout is not None:
        return step.timeout / 3600, f"steps.{step.name}.timeout ({step.timeout} s)"
    if backend in ("slurm", "parallelcluster") and spec.slurm.time_limit:
        return slurm_hours(spec.slurm.time_limit), f"slurm.time_limit ({spec.slurm.time_limit})"
    if backend == "batch" and spec.batch is not None:
        from infra.clusters.batch_config import load_batch_config

        minutes = load_batch_config(spec.batch.config).timeout_minutes
        if minutes:
            return minutes / 60, f"{spec.batch.config} timeout_minutes ({minutes})"
    return None, ""


def _interruption_reruns(spec: PipelineSpec, backend: str) -> int:
    """Re-runs a job may get after its instance goes away (0 where nothing requeues)."""
    if backend == "parallelcluster" and spec.parallelcluster is not None \
            and spec.parallelcluster.spot:
        return spec.parallelcluster.max_interruptions
    if backend == "batch" and spec.batch is not None:
        from infra.clusters.batch_config import load_batch_config

        return load_batch_config(spec.batch.config).interruptions_allowed
    return 0


def _parallel(plan: Plan, step: StepSpec, points: int) -> int:
    sweep = step.sweep
    if sweep is None and step.name in plan.per_point_of:
        sweep = plan.steps[plan.per_point_of[step.name]].sweep
    return max(1, min(points, sweep.max_parallel if sweep else 1))


def _pc_node(spec: PipelineSpec, raw: dict[str, Any], region: str, ranks: int,
             prices: PriceTable, notes: list[str]) -> tuple[str, int, float, float, str]:
    """(instance type, nodes, USD per node-hour, On-Demand USD per node-hour, pricing)."""
    from infra.clusters import instance_types

    queues = raw["Scheduling"]["SlurmQueues"]
    name = spec.parallelcluster.queue or queues[0]["Name"]
    queue = next(q for q in queues if q["Name"] == name)
    capacity = "SPOT" if queue.get("CapacityType") == "SPOT" else "ON_DEMAND"
    options = []
    for cr in queue["ComputeResources"]:
        types = ([cr["InstanceType"]] if "InstanceType" in cr
                 else [i["InstanceType"] for i in cr.get("Instances", [])])
        for t in types:
            it = instance_types.lookup(t)
            cpus = it.cores if cr.get("DisableSimultaneousMultithreading") else it.vcpus
            nodes = math.ceil(ranks / cpus)
            rate, how = prices.instance_hour(region, t, capacity)
            od, _ = prices.instance_hour(region, t, "ON_DEMAND")
            options.append((nodes * rate, t, nodes, rate, od, how))
    _, t, nodes, rate, od, how = max(options)
    if len(options) > 1:
        notes.append(f"queue {name} offers {', '.join(o[1] for o in options)}: priced at the "
                     f"dearest ({t} x {nodes}), since Slurm may place a job on any of them")
    return t, nodes, rate, od, how


def _pc_fixed(spec: PipelineSpec, raw: dict[str, Any], region: str, prices: PriceTable,
              hours: float | None, est: Estimate) -> None:
    """Head node and the storage the cluster creates, for the run's wall time + setup."""
    billed = None if hours is None else hours + SETUP_HOURS
    head = raw["HeadNode"]["InstanceType"]
    rate, how = prices.instance_hour(region, head, "ON_DEMAND")
    est.lines.append(Line(item=f"head node ({spec.parallelcluster.cluster_name})",
                          kind="head_node", backend="parallelcluster", instance_type=head,
                          nodes=1, hours=billed, usd_per_hour=rate, pricing=how).finish())
    for s in raw.get("SharedStorage", []):
        if s["StorageType"] == "FsxLustre":
            fsx = s.get("FsxLustreSettings", {})
            if fsx.get("FileSystemId"):
                est.assumptions.append(f"FSx {s['Name']}: an existing file system "
                                       f"({fsx['FileSystemId']}) is not billed to this run")
                continue
            gb = int(fsx.get("StorageCapacity", 1200))
            dep = fsx.get("DeploymentType", "SCRATCH_2")
            per_gb = prices.fsx_gb_month(region, dep, fsx.get("PerUnitStorageThroughput"))
            est.lines.append(Line(
                item=f"FSx for Lustre {s['Name']} ({gb} GB {dep})", kind="storage",
                backend="parallelcluster", hours=billed,
                usd_per_hour=gb * per_gb / prices.hours_per_month,
                pricing=f"{per_gb} USD/GB-month / {prices.hours_per_month:g} h").finish())
        elif s["StorageType"] == "Ebs":
            ebs = s.get("EbsSettings", {})
            if ebs.get("VolumeId"):
                continue
            gb, vt = int(ebs.get("Size", 35)), ebs.get("VolumeType", "gp3")
            per_gb = prices.ebs_gb_month(region, vt)
            est.lines.append(Line(
                item=f"EBS {s['Name']} ({gb} GB {vt})", kind="storage",
                backend="parallelcluster", hours=billed,
                usd_per_hour=gb * per_gb / prices.hours_per_month,
                pricing=f"{per_gb} USD/GB-month / {prices.hours_per_month:g} h").finish())
    est.assumptions.append(f"head node and storage billed for the run's wall time plus "
                           f"{SETUP_HOURS:g} h to create the cluster")
    if spec.parallelcluster.teardown != "after_run":
        fixed = sum(ln.usd_per_hour for ln in est.lines if ln.kind != "compute")
        est.assumptions.append(f"teardown {spec.parallelcluster.teardown!r}: the cluster stays "
                               f"after the run, costing {fixed:.4f} USD/h (head node and "
                               "storage) until it is deleted")


def run_backends(spec: PipelineSpec) -> set[str]:
    """The backends a run opens: each step's, or the spec's for a single-kernel spec."""
    if spec.steps:
        return {s.backend or spec.backend for s in spec.step_list()}
    return {spec.backend}


def estimate(spec: PipelineSpec, plan: Plan, prices: PriceTable,
             hourly_usd: float | None = None) -> Estimate:
    """Price ``plan`` (every step and sweep point of ``spec``) with ``prices``.

    ``hourly_usd`` (a spec's ``budget.hourly_usd``) replaces the table's rates by one rate for
    the whole run: the way to budget a backend that has no AWS price (the local stand-in).
    """
    est = Estimate(prices_as_of=prices.as_of, prices_source=prices.path)
    pc_raw: dict[str, Any] | None = None
    region = spec.region
    if spec.parallelcluster is not None:
        from infra.clusters.parallelcluster_validate import config_region, load_cluster_config

        pc_raw = load_cluster_config(spec.parallelcluster.config).raw
        region = config_region(pc_raw, spec.region)
    wall: float | None = 0.0
    peak = 0.0
    for name, step in plan.steps.items():
        backend = step.backend or spec.backend
        ranks = plan.ranks(step, spec.ranks)
        points = len(plan.points[name])
        parallel = _parallel(plan, step, points)
        hours, why = _step_hours(spec, step, backend)
        line = Line(item=f"step {name}", kind="compute", backend=backend, points=points,
                    parallel=parallel, hours=hours)
        od_rate: float | None = None
        try:
            if backend == "parallelcluster" and pc_raw is not None:
                (line.instance_type, line.nodes, line.usd_per_hour, od_rate,
                 line.pricing) = _pc_node(spec, pc_raw, region, ranks, prices, est.assumptions)
            elif backend == "batch" and spec.batch is not None:
                from infra.clusters.batch.bodies import nodes_for
                from infra.clusters.batch_config import load_batch_config

                cfg = load_batch_config(spec.batch.config)
                line.instance_type, line.nodes = cfg.instance_type, nodes_for(cfg, ranks)
                line.usd_per_hour, line.pricing = prices.instance_hour(
                    cfg.region, cfg.instance_type, "ON_DEMAND")
            else:
                line.pricing = f"{backend}: this machine's own CPUs, no AWS price"
        except (PriceError, ValueError) as e:  # a price or a size the plan cannot give
            est.unpriced.append(f"step {name}: {e}")
            line.hours = None
        free = backend in ("local", "slurm") and hourly_usd is None
        if hours is None and not free:
            est.unknown.append(f"step {name}: no time limit, so its hours are unbounded; set "
                               f"steps.{name}.timeout (seconds)" + (
                                   " or slurm.time_limit" if backend in ("slurm",
                                                                         "parallelcluster")
                                   else ""))
        elif hours is not None:
            if step.retries:  # each retry may run to the limit again
                hours *= 1 + step.retries
                why += f" x {1 + step.retries} attempts (retries: {step.retries})"
            line.hours = hours if line.hours is not None else None
            est.assumptions.append(f"step {name}: {hours:g} h per point from {why}")
            reruns = _interruption_reruns(spec, backend)
            if reruns and not free:
                est.assumptions.append(
                    f"step {name}: not included: up to {reruns} re-run(s) after instance loss "
                    f"(max_interruptions), each resuming from the newest checkpoint; without "
                    f"checkpoints each may cost the step's hours again")
        line.finish(od_rate)
        if free:  # this machine's CPUs: nothing is billed, however long it runs
            line.usd = line.usd_on_demand = 0.0
        if hours is not None and line.hours is not None:
            line.wall_hours = math.ceil(points / parallel) * hours
            wall = None if wall is None else wall + line.wall_hours
        else:
            wall = None
        peak = max(peak, parallel * line.nodes * line.usd_per_hour)
        est.lines.append(line)
    if len(plan.steps) > 1:
        est.assumptions.append("steps run one after another (wall time is their sum)")
    if pc_raw is not None:
        try:
            _pc_fixed(spec, pc_raw, region, prices, wall, est)
        except PriceError as e:
            est.unpriced.append(str(e))
    fixed = sum(ln.usd_per_hour for ln in est.lines if ln.kind != "compute")
    est.usd_per_hour = round(peak + fixed, 4)
    est.wall_hours = wall
    if hourly_usd is not None:
        est.usd_per_hour = hourly_usd
        est.assumptions.append(f"budget.hourly_usd: the whole run priced at {hourly_usd:g} "
                               "USD per hour of wall time instead of the price table")
        total = None if wall is None else round(hourly_usd * wall, 4)
        est.usd = est.usd_on_demand = total
        return est
    known = all(ln.usd is not None for ln in est.lines) and not (est.unknown or est.unpriced)
    est.usd = round(sum(ln.usd or 0 for ln in est.lines), 4) if known else None
    est.usd_on_demand = (round(sum(ln.usd_on_demand or 0 for ln in est.lines), 4)
                         if known else None)
    return est


def estimate_spec(spec: PipelineSpec, spec_path: Path | str,
                  prices: PriceTable) -> Estimate:
    """``estimate`` for a spec as written (its step graph, or its single kernel as one step)."""
    from flows.spec import step_plan
    from flows.steps.graph import Point

    if spec.steps:
        plan = step_plan(spec, Path(spec_path))
    else:
        step = StepSpec(name=spec.kernel.name, uses=spec.kernel.name,
                        parameters=spec.kernel.parameters.model_dump(),
                        retries=spec.kernel.retries)
        plan = Plan(steps={step.name: step}, inputs={}, upstream_steps={},
                    points={step.name: [Point(step.name, 0, "", {})]})
    hourly = spec.budget.hourly_usd if spec.budget is not None else None
    return estimate(spec, plan, prices, hourly_usd=hourly)
