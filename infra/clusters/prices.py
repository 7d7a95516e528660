"""The price table that cost estimates use: shipped, dated, and replaceable.

``clusterflow plan`` and a spec's ``budget:`` estimate what a run costs before anything is
created. The figures come from ``infra/clusters/data/prices.json`` (hand-transcribed from the
public AWS price pages, with the date and source in the file), or from a user's own file of the
same shape (``--prices FILE`` / ``budget.prices``): prices change, and an estimate is only as
good as its table, so the table's date and source travel with every estimate.

Spot figures are typical, not quotes: Spot moves hourly per Availability Zone. A type without a
Spot figure (``null``, e.g. hpc7a, which AWS offers On-Demand only) is priced On-Demand for a
Spot queue, and the estimate says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SHIPPED = Path(__file__).parent / "data" / "prices.json"
Capacity = Literal["ON_DEMAND", "SPOT"]


class PriceError(ValueError):
    """A price table that cannot be read, or a price it does not have (message says which)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InstancePrice(_Strict):
    on_demand: float = Field(ge=0, description="USD per instance-hour, Linux On-Demand")
    spot: float | None = Field(None, ge=0, description="typical USD per instance-hour on Spot")


class RegionPrices(_Strict):
    instances: dict[str, InstancePrice] = Field(default_factory=dict)
    fsx_lustre_gb_month: dict[str, float] = Field(
        default_factory=dict, description="'SCRATCH_2' or 'PERSISTENT_2/<MB/s/TiB>' -> USD")
    ebs_gb_month: dict[str, float] = Field(default_factory=dict)


class PriceTable(_Strict):
    as_of: str = Field(min_length=1)
    currency: Literal["USD"] = "USD"
    source: str = Field(min_length=1)
    hours_per_month: float = Field(730, gt=0)
    regions: dict[str, RegionPrices]
    path: str = Field("", exclude=True)

    def _region(self, region: str) -> RegionPrices:
        try:
            return self.regions[region]
        except KeyError:
            raise PriceError(f"{self.path}: no prices for region {region} (it has "
                             f"{', '.join(sorted(self.regions))}); add it or pass --prices "
                             "FILE") from None

    def instance_hour(self, region: str, instance_type: str,
                      capacity: Capacity = "ON_DEMAND") -> tuple[float, str]:
        """USD per instance-hour and how it was priced ('on-demand', 'spot', or the fallback)."""
        prices = self._region(region).instances.get(instance_type)
        if prices is None:
            raise PriceError(f"{self.path}: no price for {instance_type} in {region}; add it "
                             "to a copy of the table and pass --prices FILE")
        if capacity == "SPOT":
            if prices.spot is not None:
                return prices.spot, "spot"
            return prices.on_demand, "on-demand (no Spot figure: not offered on Spot)"
        return prices.on_demand, "on-demand"

    def fsx_gb_month(self, region: str, deployment: str, throughput: int | None) -> float:
        table = self._region(region).fsx_lustre_gb_month
        key = deployment if deployment.startswith("SCRATCH") else f"{deployment}/{throughput}"
        if key not in table:
            raise PriceError(f"{self.path}: no FSx for Lustre price for {key} in {region} "
                             f"(it has {', '.join(sorted(table))})")
        return table[key]

    def ebs_gb_month(self, region: str, volume_type: str) -> float:
        table = self._region(region).ebs_gb_month
        if volume_type not in table:
            raise PriceError(f"{self.path}: no EBS price for {volume_type} in {region}")
        return table[volume_type]


def load_prices(path: Path | str | None = None) -> PriceTable:
    """The shipped table, or the user's file (refused with a one-line reason if malformed)."""
    source = Path(path) if path is not None else SHIPPED
    try:
        text = source.read_text()
    except OSError as e:
        raise PriceError(f"price table {source}: {e.strerror or e}") from None
    try:
        table = PriceTable.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise PriceError(f"price table {source}: {where}: {first['msg']}") from None
    return table.model_copy(update={"path": str(source)})
