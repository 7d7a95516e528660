"""Live prices: the Price List API and the Spot price history, with botocore's Stubber.

The embedded endpoint has neither API, so the answers are stubbed in the shapes AWS sends
(a ``PriceList`` of JSON strings; ``SpotPriceHistory`` rows per Availability Zone), and the
Stubber checks every request against the service models: the filters, the region, the call.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.config import Config
from botocore.stub import ANY, Stubber

from flows.budget import run_estimate
from flows.spec import load_spec
from infra.clusters.live_prices import (
    instance_types_priced,
    live_table,
    location_name,
    on_demand_filters,
    on_demand_price,
)
from infra.clusters.prices import load_prices
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[3]
PC_SPOT = REPO / "cluster_configs" / "efa-spot-us-east-1.yaml"
MONTH = 730
NOW = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)


def _product(itype: str, location: str, usd: str) -> str:
    """One ``PriceList`` entry as the Price List API sends it (a JSON string)."""
    sku = "JRTCKXETXF" + itype.replace(".", "")[:6].upper()
    return json.dumps({
        "product": {
            "productFamily": "Compute Instance",
            "attributes": {
                "instanceType": itype, "location": location, "locationType": "AWS Region",
                "operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA",
                "capacitystatus": "Used", "licenseModel": "No License required",
                "operation": "RunInstances", "usagetype": f"BoxUsage:{itype}",
                "servicecode": "AmazonEC2", "regionCode": "us-east-1",
            },
            "sku": sku,
        },
        "serviceCode": "AmazonEC2",
        "terms": {
            "OnDemand": {f"{sku}.JRTCKXETXF": {
                "priceDimensions": {f"{sku}.JRTCKXETXF.6YS6EN2CT7": {
                    "unit": "Hrs", "endRange": "Inf", "beginRange": "0",
                    "description": f"${usd} per On Demand Linux {itype} Instance Hour",
                    "appliesTo": [], "rateCode": f"{sku}.JRTCKXETXF.6YS6EN2CT7",
                    "pricePerUnit": {"USD": usd}}},
                "sku": sku, "effectiveDate": "2026-11-01T00:00:00Z",
                "offerTermCode": "JRTCKXETXF", "termAttributes": {}}},
            "Reserved": {f"{sku}.4NA7Y494T4": {
                "priceDimensions": {f"{sku}.4NA7Y494T4.6YS6EN2CT7": {
                    "unit": "Hrs", "pricePerUnit": {"USD": "0.0010000000"},
                    "description": "Linux reserved", "appliesTo": []}},
                "sku": sku, "termAttributes": {"LeaseContractLength": "1yr"}}},
        },
        "version": "20261101000000",
        "publicationDate": "2026-11-01T00:00:00Z",
    })


def _spot_rows(itype: str, by_az: dict[str, float]) -> list[dict]:
    rows = []
    for az, usd in by_az.items():
        rows.append({"AvailabilityZone": az, "InstanceType": itype,
                     "ProductDescription": "Linux/UNIX", "SpotPrice": f"{usd:.6f}",
                     "Timestamp": NOW - timedelta(minutes=5)})
        # An older, dearer price in the same AZ: the newest one counts.
        rows.append({"AvailabilityZone": az, "InstanceType": itype,
                     "ProductDescription": "Linux/UNIX", "SpotPrice": "9.999999",
                     "Timestamp": NOW - timedelta(hours=3)})
    return rows


class _Clients:
    """Stubbed real clients, one per (service, region), with everything asked checked."""

    def __init__(self) -> None:
        self.made: dict[tuple[str, str], tuple[object, Stubber]] = {}

    def stub(self, service: str, region: str) -> Stubber:
        if (service, region) not in self.made:
            client = boto3.session.Session().client(
                service, region_name=region, aws_access_key_id="x", aws_secret_access_key="x")
            stubber = Stubber(client)
            stubber.activate()
            self.made[(service, region)] = (client, stubber)
        return self.made[(service, region)][1]

    def __call__(self, service: str, region: str) -> object:
        self.stub(service, region)
        return self.made[(service, region)][0]

    def on_demand(self, region: str, itype: str, usd: str) -> None:
        self.stub("pricing", "us-east-1").add_response(
            "get_products", {"FormatVersion": "aws_v1",
                             "PriceList": [_product(itype, location_name(region), usd)]},
            {"ServiceCode": "AmazonEC2", "Filters": on_demand_filters(region, itype),
             "FormatVersion": "aws_v1", "MaxResults": 10})

    def spot(self, region: str, itype: str, by_az: dict[str, float]) -> None:
        self.stub("ec2", region).add_response(
            "describe_spot_price_history", {"SpotPriceHistory": _spot_rows(itype, by_az)},
            {"InstanceTypes": [itype], "ProductDescriptions": ["Linux/UNIX"], "StartTime": ANY})

    def done(self) -> None:
        for _, stubber in self.made.values():
            stubber.assert_no_pending_responses()


def test_filters_select_one_linux_shared_product_by_location() -> None:
    filters = {f["Field"]: f["Value"] for f in on_demand_filters("us-east-2", "hpc7a.96xlarge")}
    assert filters == {"instanceType": "hpc7a.96xlarge", "location": "US East (Ohio)",
                       "operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA",
                       "capacitystatus": "Used"}
    assert location_name("us-east-1") == "US East (N. Virginia)"
    assert location_name("eu-west-1") == "Europe (Ireland)"


def test_on_demand_price_reads_the_on_demand_term_only() -> None:
    assert on_demand_price([_product("c6i.xlarge", "US East (N. Virginia)", "0.1700000000")],
                           "c6i.xlarge") == 0.17
    with pytest.raises(LookupError, match="no hourly On-Demand"):
        on_demand_price([], "c6i.xlarge")
    two = [_product("c6i.xlarge", "x", "0.17"), _product("c6i.xlarge", "x", "0.19")]
    with pytest.raises(LookupError, match="2 different"):
        on_demand_price(two, "c6i.xlarge")


def _spot_spec(tmp_path: Path, live: bool = False) -> Path:
    body = {"name": "live-test", "backend": "parallelcluster", "ranks": 144,
            "scratch_dir": "/fsx/clusterflow",
            "storage": {"input_bucket": "live-in-bucket", "results_bucket": "live-out-bucket"},
            "parallelcluster": {"config": str(PC_SPOT), "cluster_name": "cf-live"},
            "kernel": {"name": "heat", "retries": 1}, "slurm": {"time_limit": "1:30:00"}}
    if live:
        body["budget"] = {"max_usd": 1000, "live_prices": True}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_the_estimate_asks_for_exactly_the_types_the_run_uses(tmp_path: Path) -> None:
    path = _spot_spec(tmp_path)
    from flows.planning.estimate import estimate_spec

    wanted = instance_types_priced(lambda t: estimate_spec(load_spec(path), path, t))
    # Both compute resources of the queue (priced at the dearest) and the head node.
    assert wanted == {("us-east-1", "c6in.32xlarge"), ("us-east-1", "c5n.18xlarge"),
                      ("us-east-1", "c6i.xlarge")}


def test_live_prices_replace_the_table_where_aws_answers_by_hand(tmp_path: Path) -> None:
    clients = _Clients()
    # Sorted order of the asks: c5n, c6i (head node), c6in.
    clients.on_demand("us-east-1", "c5n.18xlarge", "3.8880000000")
    clients.spot("us-east-1", "c5n.18xlarge", {"us-east-1a": 1.21, "us-east-1b": 1.17})
    clients.stub("pricing", "us-east-1").add_client_error(
        "get_products", "AccessDeniedException", "User is not authorized to perform: "
        "pricing:GetProducts")
    clients.spot("us-east-1", "c6i.xlarge", {"us-east-1a": 0.061})
    clients.on_demand("us-east-1", "c6in.32xlarge", "7.4000000000")
    clients.spot("us-east-1", "c6in.32xlarge", {"us-east-1a": 2.9012, "us-east-1b": 3.1044,
                                                 "us-east-1d": 2.75})
    path = _spot_spec(tmp_path, live=True)
    est = run_estimate(load_spec(path), path, clients=clients)  # budget.live_prices: true
    clients.done()
    job = est.lines[0]
    # c6in: 2 nodes at the dearest AZ's current Spot price, 1.5 h x 2 attempts; c5n would
    # be 2 x 1.21. The head node's On-Demand price was denied: the table's 0.17 stays.
    assert (job.instance_type, job.nodes, job.hours) == ("c6in.32xlarge", 2, 3.0)
    assert job.usd == pytest.approx(2 * 3.0 * 3.1044)
    assert job.usd_on_demand == pytest.approx(2 * 3.0 * 7.40)
    billed = 3.0 + 0.25
    fixed = billed * (0.17 + 1200 * 0.14 / MONTH + 100 * 0.08 / MONTH)
    assert est.usd == pytest.approx(2 * 3.0 * 3.1044 + fixed, abs=1e-3)
    assert est.prices_as_of.startswith("live ") and "table of 2025-05" in est.prices_as_of
    assert "AWS Price List API" in est.prices_source
    denied = [n for n in est.price_notes if n.startswith("c6i.xlarge in us-east-1: On-Demand")]
    assert denied and "table (0.17)" in denied[0] and "AccessDeniedException" in denied[0]
    assert any("Spot 3.1044 USD/h is the highest of 3" in n for n in est.price_notes)
    # A Spot queue requeues (max_interruptions 3 by default): said, not silently left out.
    assert any("not included: up to 3 re-run(s) after instance loss" in a
               for a in est.assumptions)


def test_unreachable_aws_falls_back_to_the_table_and_says_so(tmp_path: Path) -> None:
    """Real clients against a closed local port: the network error of the first call is said
    once per service, every figure stays the table's, and nothing is called again."""
    made: list[tuple[str, str]] = []

    def clients(service: str, region: str) -> object:
        made.append((service, region))
        return boto3.session.Session().client(
            service, region_name=region, endpoint_url="http://127.0.0.1:9",
            aws_access_key_id="x", aws_secret_access_key="x",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2))

    base = load_prices()
    got = live_table(base, {("us-east-1", "c6in.32xlarge"), ("us-east-1", "c5n.18xlarge")},
                     clients, now=NOW)
    assert got.live == 0
    assert got.table.as_of == "2025-05" and got.table.regions == base.regions
    assert got.notes[0] == ("no live price could be read at 2026-12-07T06:00Z: using the "
                            "table of 2025-05")
    assert sum("Could not connect" in n for n in got.notes) == 4  # 2 types x (OD, Spot)
    assert made == [("pricing", "us-east-1"), ("ec2", "us-east-1")]  # not asked again


def test_plan_live_offline_uses_the_table_and_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "CLUSTERFLOW_HOME": str(tmp_path / "home")}
    result = run_cli(["plan", str(_spot_spec(tmp_path)), "--live", "--offline"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "prices as of 2025-05 from" in result.stdout
    assert "prices: live prices not read (--offline): the table's prices" in result.stdout


def _config_types(raw: dict) -> tuple[str, set[tuple[str, str]]]:
    """(what, {(region, instance type)}) for a ParallelCluster or Batch config, else empty."""
    if "Scheduling" in raw:
        region = raw["Region"]
        types = {raw["HeadNode"]["InstanceType"]}
        for q in raw["Scheduling"]["SlurmQueues"]:
            cap = "SPOT" if q.get("CapacityType") == "SPOT" else "ON_DEMAND"
            for cr in q["ComputeResources"]:
                found = [cr["InstanceType"]] if "InstanceType" in cr else [
                    i["InstanceType"] for i in cr["Instances"]]
                types |= {f"{t}@{cap}" for t in found}
        return "parallelcluster", {(region, t) for t in types}
    if raw.get("kind") == "batch-mnp":
        return "batch", {(raw.get("region", "us-east-1"), raw["instance_type"])}
    return "other", set()


def test_the_shipped_table_prices_every_instance_type_in_cluster_configs() -> None:
    """A config added with a type the table lacks would make `plan` say "unpriced" and a
    budgeted run refuse: the table must grow with the configs."""
    table = load_prices()
    seen: dict[str, int] = {}
    for path in sorted((REPO / "cluster_configs").rglob("*.yaml")):
        kind, wanted = _config_types(yaml.safe_load(path.read_text()))
        seen[kind] = seen.get(kind, 0) + 1
        for region, entry in wanted:
            itype, _, capacity = entry.partition("@")
            rate, how = table.instance_hour(region, itype, capacity or "ON_DEMAND")
            assert rate > 0, f"{path.name}: {itype} in {region}"
            if capacity == "SPOT" and not itype.startswith("hpc"):
                assert how == "spot", f"{path.name}: no Spot figure for {itype} in {region}"
    assert seen.get("parallelcluster", 0) >= 2 and seen.get("batch", 0) >= 2, seen
