"""A spec's ``budget:``: refuse a run that would cost too much, and stop one that does.

Two guards, because an estimate is an upper bound built from limits and a price table, and
reality can still differ (a table that is out of date, a cluster kept longer than planned):

1. before anything is created, the run's estimate (``flows.planning.estimate``) must fit
   ``max_usd``, and every instance must have a price (without one the watchdog would have no
   rate). A step without a time limit has no upper bound: the run is allowed, and only the
   watchdog bounds what it spends;
2. during the run a watchdog thread multiplies the time since the run started by the run's
   hourly rate (the estimate's peak burn rate, or ``hourly_usd``) and, once that passes
   ``max_usd``, cancels every job the run submitted, deletes the cluster / removes the Batch
   environment whatever ``teardown`` says, and fails the run with a message saying so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flows.watchdog import Budget, BudgetExceeded, Watchdog, _active, guard

if TYPE_CHECKING:
    from flows.planning.estimate import Estimate
    from flows.spec import PipelineSpec
    from infra.aws.clients import AwsTarget

__all__ = ["Budget", "BudgetExceeded", "Watchdog", "budget_watch", "check_budget", "guard",
           "run_estimate"]


def run_estimate(spec: PipelineSpec, spec_path: Path | str,
                 prices_path: Path | str | None = None, *, live: bool | None = None,
                 clients: Any = None) -> Estimate:
    """The run's estimate from the table (``prices_path``, else ``budget.prices``, else the
    shipped one); with ``live`` (default: ``budget.live_prices``) instance prices are AWS's
    current ones where AWS answers (``infra.clusters.live_prices``), the table's elsewhere,
    and ``price_notes`` says which. ``clients``: (service, region) -> client, for tests."""
    from flows.planning.estimate import estimate_spec
    from infra.clusters.prices import load_prices

    if prices_path is None and spec.budget is not None:
        prices_path = spec.budget.prices
    if live is None:
        live = spec.budget is not None and spec.budget.live_prices
    table = load_prices(prices_path)
    if not live:
        return estimate_spec(spec, spec_path, table)
    from infra.clusters.live_prices import aws_clients, instance_types_priced, live_table

    wanted = instance_types_priced(lambda t: estimate_spec(spec, spec_path, t))
    got = live_table(table, wanted, clients or aws_clients())
    est = estimate_spec(spec, spec_path, got.table)
    est.price_notes = got.notes
    return est


def check_budget(spec: PipelineSpec, spec_path: Path | str) -> Estimate | None:
    """Refuse (``SpecError``, so exit 2 with nothing created) a run its budget cannot cover."""
    from flows.spec import SpecError
    from infra.clusters.prices import PriceError

    if spec.budget is None:
        return None
    try:
        est = run_estimate(spec, spec_path)
    except PriceError as e:
        raise SpecError(f"{spec_path}: budget: {e}") from None
    cap = spec.budget.max_usd
    if est.unpriced:
        raise SpecError(f"{spec_path}: budget.max_usd is {cap:g} USD but the run cannot be "
                        "priced: " + "; ".join(est.unpriced))
    if est.usd is not None and est.usd > cap:
        raise SpecError(f"{spec_path}: the run's estimate of {est.usd:.2f} USD exceeds "
                        f"budget.max_usd ({cap:g} USD); nothing was created. See `clusterflow "
                        "plan` for the breakdown, lower the sweep or limits, or raise the budget")
    return est


def _cloud_teardown(spec: PipelineSpec, aws: AwsTarget) -> list[Callable[[], Any]]:
    """Delete what the run's cloud backends stand up, whatever their ``teardown`` says."""
    import dataclasses

    from flows.planning.estimate import run_backends

    out: list[Callable[[], Any]] = []
    backends = run_backends(spec)
    if "parallelcluster" in backends and spec.parallelcluster is not None:
        from infra.clusters.parallelcluster import ParallelCluster
        from infra.clusters.parallelcluster_validate import config_region, load_cluster_config

        s = spec.parallelcluster
        region = config_region(load_cluster_config(s.config).raw, aws.region)
        cluster = ParallelCluster(s.cluster_name, dataclasses.replace(aws, region=region))
        out.append(lambda: cluster.delete(wait=False))
    if "batch" in backends and spec.batch is not None:
        from infra.clusters.batch.provision import delete_environment
        from infra.clusters.batch_config import load_batch_config

        cfg = load_batch_config(spec.batch.config)
        target = dataclasses.replace(aws, region=cfg.region)
        out.append(lambda: delete_environment(target, cfg))
    return out


@contextlib.contextmanager
def budget_watch(spec: PipelineSpec, spec_path: Path | str, aws: AwsTarget,
                 log: Callable[[str], None] = print) -> Iterator[Watchdog | None]:
    """The run's watchdog for the block; a tripped watchdog fails the block with its message.

    The rate is ``budget.hourly_usd`` or the estimate's peak burn rate; a rate of 0 (a local
    backend with no price) needs no watchdog.
    """
    if spec.budget is None:
        yield None
        return
    rate = run_estimate(spec, spec_path).usd_per_hour
    if rate <= 0:
        log("budget: the run has no hourly rate (no AWS price, no budget.hourly_usd); "
            "the watchdog is off")
        yield None
        return
    dog = Watchdog(spec.budget.max_usd, rate, interval=spec.budget.check_seconds,
                   teardown=_cloud_teardown(spec, aws), log=log).start()
    token = _active.set(dog)
    try:
        yield dog
    except BaseException as e:
        if dog.tripped:
            raise BudgetExceeded(dog.message) from e
        raise
    finally:
        _active.reset(token)
        dog.stop()
    if dog.tripped:
        raise BudgetExceeded(dog.message)
