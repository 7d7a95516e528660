"""Live instance prices: On-Demand from the AWS Price List API, Spot from EC2's price history.

``clusterflow plan --live`` (and a budget with ``live_prices: true``) prices a run with what
AWS charges now instead of the shipped table's dated figures, for exactly the instance types
the run uses:

- On-Demand: ``pricing.get_products`` (the Price List Query API, served from us-east-1) for
  ``AmazonEC2`` with the filters that select one product per type and region: ``instanceType``,
  ``location`` (the region's Price List name, e.g. ``US East (N. Virginia)``, taken from
  botocore's own region descriptions), ``operatingSystem=Linux``, ``tenancy=Shared``,
  ``preInstalledSw=NA``, ``capacitystatus=Used``. Each ``PriceList`` entry is a JSON string;
  the price is the ``OnDemand`` term's hourly ``pricePerUnit.USD``.
- Spot: ``ec2.describe_spot_price_history`` in the region for ``Linux/UNIX`` starting now,
  which answers the current price per Availability Zone; the estimate takes the highest (it is
  an upper bound, and the job may land in any AZ the cluster's subnets allow).

Every figure that cannot be had live (no credentials, access denied, no product, a network
error) keeps the table's figure, and the reason is returned as a note, so an estimate never
silently mixes sources: ``as_of`` and ``source`` say which prices are live.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import PrivateAttr

from infra.clusters.prices import Capacity, InstancePrice, PriceTable, RegionPrices

PRICING_REGION = "us-east-1"  # the Price List Query API's endpoint (also ap-south-1, eu-central-1)
SPOT_PRODUCT = "Linux/UNIX"
ClientFactory = Callable[[str, str], Any]  # (service, region) -> boto3 client


class _Recorder(PriceTable):
    """A table that prices everything at 0 and remembers what it was asked for."""

    _asked: set[tuple[str, str]] = PrivateAttr(default_factory=set)

    def instance_hour(self, region: str, instance_type: str,
                      capacity: Capacity = "ON_DEMAND") -> tuple[float, str]:
        self._asked.add((region, instance_type))
        return 0.0, "recorded"

    def fsx_gb_month(self, region: str, deployment: str, throughput: int | None) -> float:
        return 0.0

    def ebs_gb_month(self, region: str, volume_type: str) -> float:
        return 0.0


def instance_types_priced(estimate: Callable[[PriceTable], Any]) -> set[tuple[str, str]]:
    """(region, instance type) pairs an estimate asks its table for (run it on a recorder)."""
    recorder = _Recorder(as_of="-", source="-", regions={})
    estimate(recorder)
    return set(recorder._asked)


def location_name(region: str) -> str:
    """The Price List ``location`` of a region (``us-east-1`` -> ``US East (N. Virginia)``)."""
    from botocore.loaders import Loader

    for partition in Loader().load_data("endpoints")["partitions"]:
        described = partition.get("regions", {}).get(region)
        if described and described.get("description"):
            # botocore says "Europe (Ireland)"; the Price List says the same since 2022.
            return str(described["description"])
    raise ValueError(f"region {region} has no Price List location name in botocore's data")


def on_demand_filters(region: str, instance_type: str) -> list[dict[str, str]]:
    pairs = (("instanceType", instance_type), ("location", location_name(region)),
             ("operatingSystem", "Linux"), ("tenancy", "Shared"), ("preInstalledSw", "NA"),
             ("capacitystatus", "Used"))
    return [{"Type": "TERM_MATCH", "Field": f, "Value": v} for f, v in pairs]


def on_demand_price(price_list: Iterable[str], instance_type: str) -> float:
    """The hourly On-Demand USD price in ``get_products``' ``PriceList`` (JSON strings)."""
    prices: set[float] = set()
    for entry in price_list:
        product = json.loads(entry)
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dim in term.get("priceDimensions", {}).values():
                usd = dim.get("pricePerUnit", {}).get("USD")
                if dim.get("unit") == "Hrs" and usd is not None and float(usd) > 0:
                    prices.add(float(usd))
    if not prices:
        raise LookupError(f"the Price List has no hourly On-Demand Linux price for "
                          f"{instance_type}")
    if len(prices) > 1:  # the filters should leave one product; never guess between several
        raise LookupError(f"the Price List has {len(prices)} different On-Demand Linux prices "
                          f"for {instance_type} ({', '.join(f'{p:g}' for p in sorted(prices))})")
    return prices.pop()


def spot_price(history: Iterable[dict[str, Any]], instance_type: str) -> tuple[float, int]:
    """(highest current Spot price across AZs, number of AZs) from the price history."""
    latest: dict[str, tuple[datetime, float]] = {}
    for row in history:
        az, when, usd = row["AvailabilityZone"], row["Timestamp"], float(row["SpotPrice"])
        if az not in latest or when > latest[az][0]:
            latest[az] = (when, usd)
    if not latest:
        raise LookupError(f"EC2 reports no Spot price for {instance_type} (not offered on Spot "
                          "there)")
    return max(usd for _, usd in latest.values()), len(latest)


@dataclass
class LivePrices:
    table: PriceTable
    notes: list[str] = field(default_factory=list)
    live: int = 0  # figures that came from AWS


class _Down(RuntimeError):
    """A service that cannot be reached at all (no credentials, no network)."""


def _why(e: Exception) -> str:
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")
    return str(e) or type(e).__name__


def live_table(base: PriceTable, wanted: Iterable[tuple[str, str]],
               clients: ClientFactory, *, now: datetime | None = None) -> LivePrices:
    """``base`` with live On-Demand and Spot figures for ``wanted`` (region, type) pairs.

    Falls back per figure: what AWS does not answer keeps the table's figure (a type the
    table lacks too stays unpriced, and the estimate says so), with a note saying why.
    """
    now = now or datetime.now(UTC)
    regions = {r: dict(p.instances) for r, p in base.regions.items()}
    notes: list[str] = []
    live = 0
    # No credentials, no network: said once per service and region, not asked again.
    down: dict[tuple[str, str], str] = {}

    def ask(service: str, region: str, call: Callable[[Any], Any]) -> Any:
        if (service, region) in down:
            raise _Down(down[(service, region)])
        try:
            return call(clients(service, region))
        except BotoCoreError as e:
            down[(service, region)] = _why(e)
            raise _Down(down[(service, region)]) from None

    for region, itype in sorted(set(wanted)):
        known = regions.setdefault(region, {}).get(itype)
        on_demand = known.on_demand if known else None
        spot = known.spot if known else None
        try:
            got = ask("pricing", PRICING_REGION, lambda c, r=region, t=itype: c.get_products(
                ServiceCode="AmazonEC2", Filters=on_demand_filters(r, t),
                FormatVersion="aws_v1", MaxResults=10))
            on_demand = on_demand_price(got["PriceList"], itype)
            live += 1
        except (ClientError, _Down, LookupError, ValueError) as e:
            notes.append(f"{itype} in {region}: On-Demand from the table "
                         f"({'none' if on_demand is None else on_demand}): {_why(e)}")
        try:
            history = ask("ec2", region, lambda c, t=itype: c.describe_spot_price_history(
                InstanceTypes=[t], ProductDescriptions=[SPOT_PRODUCT], StartTime=now))
            spot, azs = spot_price(history["SpotPriceHistory"], itype)
            live += 1
            notes.append(f"{itype} in {region}: Spot {spot:g} USD/h is the highest of {azs} "
                         "Availability Zone(s) now")
        except (ClientError, _Down, LookupError, ValueError) as e:
            notes.append(f"{itype} in {region}: Spot from the table "
                         f"({'none' if spot is None else spot}): {_why(e)}")
        if on_demand is not None:
            regions[region][itype] = InstancePrice(on_demand=on_demand, spot=spot)
    new_regions = {r: (base.regions[r] if r in base.regions else RegionPrices())
                   .model_copy(update={"instances": inst}) for r, inst in regions.items()}
    stamp = now.strftime("%Y-%m-%dT%H:%MZ")
    if live:
        as_of = f"live {stamp} (storage and anything not answered: table of {base.as_of})"
        source = (f"AWS Price List API (pricing, {PRICING_REGION}) and EC2 Spot price history; "
                  f"fallback {base.path}")
    else:
        as_of, source = base.as_of, base.path
        notes.insert(0, f"no live price could be read at {stamp}: using the table of "
                        f"{base.as_of}")
    table = base.model_copy(update={"regions": new_regions, "as_of": as_of, "path": source})
    return LivePrices(table, notes, live)


def aws_clients() -> ClientFactory:
    """Clients on the standard credential chain (prices are read from AWS itself)."""
    import boto3

    session = boto3.session.Session()

    def make(service: str, region: str) -> Any:
        return session.client(service, region_name=region)

    return make
