"""What clusterflow knows about EC2 instance types: vCPUs, cores, memory, EFA and GPUs.

Config checks (EFA on a type without EFA, a GPU queue without GPUs, Batch node sizing) must work
offline, so the facts ship as data (``infra/clusters/data/instance_types.json``), built from two
complete offline sources by ``python -m infra.clusters.instance_types``:

- ``types``: EC2 ``DescribeInstanceTypes`` output reduced to the fields clusterflow uses, from the
  snapshot of real AWS data moto ships (``moto/ec2/resources/instance_types.json.gz``);
- ``names``: every value of the ``InstanceType`` enum in botocore's EC2 service model, which
  also lists types moto has no facts for (older generations, the newest launches).

A name in ``names`` without facts is a real EC2 type this catalog cannot say more about; a name
in neither is "unknown to this catalog", never "not an EC2 instance type" (a type launched
after this botocore is real too). ``--aws real --region R`` adds your account's
``DescribeInstanceTypes`` on top, when AWS has added types.
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import json
from dataclasses import dataclass
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
    """No facts for this name in the catalog; the message says whether botocore knows the name
    (``known_name``) and suggests close names."""

    def __init__(self, message: str, *, known_name: bool = False) -> None:
        super().__init__(message)
        self.known_name = known_name

    def __str__(self) -> str:
        return str(self.args[0])


@lru_cache(maxsize=1)
def catalog() -> dict[str, InstanceType]:
    raw = json.loads(DATA.read_text())
    return {name: InstanceType(name, *fields) for name, fields in raw["types"].items()}


@lru_cache(maxsize=1)
def known_names() -> frozenset[str]:
    """Every instance type name the catalog knows, with or without facts."""
    raw = json.loads(DATA.read_text())
    return frozenset(raw.get("names", ())) | frozenset(catalog())


def lookup(name: str) -> InstanceType:
    try:
        return catalog()[name]
    except KeyError:
        pass
    if name in known_names():
        raise UnknownInstanceType(
            f"'{name}' is an EC2 instance type (botocore lists it) whose vCPUs, EFA and GPUs are "
            "unknown to this catalog (moto's DescribeInstanceTypes snapshot has no entry for it)",
            known_name=True)
    close = difflib.get_close_matches(name, known_names(), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownInstanceType(f"'{name}' is unknown to this catalog ({len(known_names())} "
                              f"instance types: botocore's list and moto's snapshot){hint}")


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


def moto_snapshot() -> dict[str, list[Any]]:
    """moto's shipped ``DescribeInstanceTypes`` data (a snapshot of real AWS), reduced."""
    import moto

    path = Path(moto.__file__).parent / "ec2" / "resources" / "instance_types.json.gz"
    with gzip.open(path, "rt") as f:
        raw: dict[str, dict[str, Any]] = json.load(f)
    return dict(sorted((name, _reduce(it)) for name, it in raw.items()))


def botocore_names() -> list[str]:
    """The ``InstanceType`` enum of botocore's EC2 model: every name EC2 accepted when that
    botocore was released."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2")
    return sorted(model.shape_for("InstanceType").enum)


def build(types: dict[str, list[Any]], source: str) -> dict[str, Any]:
    import botocore
    import moto

    names = sorted(set(botocore_names()) | set(types))
    return {
        "source": f"{source}; names: botocore {botocore.__version__} EC2 InstanceType enum "
                  f"(moto {moto.__version__} snapshot for the facts)",
        "fields": ["vcpus", "cores", "memory_mib", "efa_interfaces", "gpus", "gpu_name",
                   "cluster_placement"],
        "types": types,
        "names": names,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--aws", choices=["offline", "embedded", "real"], default="offline",
                   help="offline (default): moto's snapshot; or DescribeInstanceTypes live")
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--out", type=Path, default=DATA)
    args = p.parse_args(argv)
    types = moto_snapshot()
    source = "EC2 DescribeInstanceTypes (the snapshot of real AWS data shipped with moto)"
    if args.aws != "offline":
        from infra.aws.embedded import aws_target

        with aws_target(args.aws, args.region) as aws:
            types = dict(sorted({**types, **fetch(aws.client("ec2"))}.items()))
            source += f" + DescribeInstanceTypes from {aws.label}"
    doc = build(types, source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, separators=(",", ":")).replace("],", "],\n")
    args.out.write_text(text + "\n")
    print(f"wrote {len(types)} instance types with facts, {len(doc['names'])} names, to {args.out}")


if __name__ == "__main__":
    main()
