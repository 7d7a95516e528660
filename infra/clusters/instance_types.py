"""What clusterflow knows about EC2 instance types: vCPUs, cores, memory, EFA and GPUs.

Config checks (EFA on a type without EFA, a GPU queue without GPUs, Batch node sizing) must work
offline, so the facts ship as data (``infra/clusters/data/instance_types.json``). The file is
the output of EC2 ``DescribeInstanceTypes``, reduced to the fields clusterflow uses;
regenerate it from your account when AWS adds types::

    python -m infra.clusters.instance_types --aws real --region us-east-1
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "instance_types.json"


@dataclass(frozen=True)
class InstanceType:
    name: str
    vcpus: int
    cores: int
    memory_mib: int
    efa_interfaces: int  # 0: no EFA
    gpus: int
    gpu_name: str | None
    cluster_placement: bool

    @property
    def efa(self) -> bool:
        return self.efa_interfaces > 0


class UnknownInstanceType(KeyError):
    """Not an EC2 instance type clusterflow knows; the message suggests close names."""

    def __str__(self) -> str:
        return str(self.args[0])


@lru_cache(maxsize=1)
def catalog() -> dict[str, InstanceType]:
    raw = json.loads(DATA.read_text())
    return {name: InstanceType(name, *fields) for name, fields in raw["types"].items()}


def lookup(name: str) -> InstanceType:
    try:
        return catalog()[name]
    except KeyError:
        close = difflib.get_close_matches(name, catalog(), n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownInstanceType(f"'{name}' is not an EC2 instance type{hint}") from None


def efa_capable() -> list[str]:
    return sorted(n for n, t in catalog().items() if t.efa)


def gpu_types() -> list[str]:
    return sorted(n for n, t in catalog().items() if t.gpus)


def _reduce(it: dict[str, Any]) -> list[Any]:
    vcpu = it["VCpuInfo"]
    net = it.get("NetworkInfo", {})
    gpus = it.get("GpuInfo", {}).get("Gpus", [])
    efa = net.get("EfaInfo", {}).get("MaximumEfaInterfaces", 1) if net.get("EfaSupported") else 0
    return [
        vcpu["DefaultVCpus"],
        vcpu.get("DefaultCores", vcpu["DefaultVCpus"]),
        it["MemoryInfo"]["SizeInMiB"],
        efa,
        sum(g.get("Count", 0) for g in gpus),
        gpus[0]["Name"] if gpus else None,
        "cluster" in it.get("PlacementGroupInfo", {}).get("SupportedStrategies", []),
    ]


def fetch(ec2: Any, filters: list[dict[str, Any]] | None = None) -> dict[str, list[Any]]:
    """Every instance type the endpoint describes (``filters`` as EC2 takes them), reduced to
    the shipped fields."""
    types: dict[str, list[Any]] = {}
    paginator = ec2.get_paginator("describe_instance_types")
    for page in paginator.paginate(**({"Filters": filters} if filters else {})):
        for it in page["InstanceTypes"]:
            types[it["InstanceType"]] = _reduce(it)
    return dict(sorted(types.items()))


def main(argv: list[str] | None = None) -> None:
    from infra.aws.embedded import aws_target

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--aws", choices=["embedded", "real"], default="real")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--out", type=Path, default=DATA)
    args = p.parse_args(argv)
    with aws_target(args.aws, args.region) as aws:
        types = fetch(aws.client("ec2"))
        source = aws.label
    doc = {
        "source": f"EC2 DescribeInstanceTypes from {source}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "fields": ["vcpus", "cores", "memory_mib", "efa_interfaces", "gpus", "gpu_name",
                   "cluster_placement"],
        "types": types,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, separators=(",", ":")).replace("],", "],\n") + "\n")
    print(f"wrote {len(types)} instance types to {args.out}")


if __name__ == "__main__":
    main()
