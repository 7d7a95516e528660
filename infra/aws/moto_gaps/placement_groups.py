"""EC2 placement groups for the embedded endpoint: moto 5.2.5 has no model for them.

``CreatePlacementGroup`` / ``DescribePlacementGroups`` / ``DeletePlacementGroup`` answer HTTP 500
there ("action has not been implemented"), yet an AWS Batch multi-node environment with EFA
needs a cluster placement group, and the bad-input tests must be able to see that none was
created. This module adds the three actions to moto's EC2 responder inside the moto server
process, keeping the groups per account and region on moto's own EC2 backend (so
``/moto-api/reset`` clears them) and answering with the error codes AWS uses:
``InvalidPlacementGroup.Duplicate``, ``InvalidPlacementGroup.Unknown``,
``InvalidParameterValue`` (bad strategy), ``InvalidPlacementGroup.InUse`` is not modelled
(moto does not place instances into groups).

Installed by ``infra.aws.moto_gaps.apply()``; a moto that implements the actions itself wins.
"""

from __future__ import annotations

import itertools
from typing import Any

STRATEGIES = ("cluster", "spread", "partition")
_ids = itertools.count(0x10000000)
_APPLIED = False


def _groups(backend: Any) -> dict[str, dict[str, Any]]:
    if not hasattr(backend, "_clusterflow_placement_groups"):
        backend._clusterflow_placement_groups = {}
    return backend._clusterflow_placement_groups


def _error(code: str, message: str) -> Exception:
    from moto.ec2.exceptions import EC2ClientError

    return EC2ClientError(code, message)


def create_placement_group(self: Any) -> Any:
    from moto.core.responses import ActionResult

    name = self._get_param("GroupName")
    strategy = self._get_param("Strategy") or "cluster"
    if not name:
        raise _error("MissingParameter", "The request must contain the parameter GroupName")
    if strategy not in STRATEGIES:
        raise _error("InvalidParameterValue",
                     f"Value ({strategy}) for parameter strategy is invalid.")
    tags = self._parse_tag_specification("placement-group").get("placement-group", {})
    self.error_on_dryrun()
    groups = _groups(self.ec2_backend)
    if name in groups:
        raise _error("InvalidPlacementGroup.Duplicate",
                     f"The Placement Group '{name}' already exists.")
    group_id = f"pg-{next(_ids):017x}"
    group = {
        "GroupName": name,
        "GroupId": group_id,
        "GroupArn": f"arn:aws:ec2:{self.region}:{self.current_account}:placement-group/{name}",
        "State": "available",
        "Strategy": strategy,
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
    }
    if strategy == "partition":
        group["PartitionCount"] = int(self._get_param("PartitionCount") or 2)
    if strategy == "spread" and self._get_param("SpreadLevel"):
        group["SpreadLevel"] = self._get_param("SpreadLevel")
    groups[name] = group
    return ActionResult({"PlacementGroup": group})


def describe_placement_groups(self: Any) -> Any:
    from moto.core.responses import ActionResult

    names = self._get_param("GroupNames", [])
    ids = self._get_param("GroupIds", [])
    filters = self._filters_from_querystring()
    groups = list(_groups(self.ec2_backend).values())
    for wanted, key in ((names, "GroupName"), (ids, "GroupId")):
        if wanted:
            known = {g[key] for g in groups}
            missing = [w for w in wanted if w not in known]
            if missing:
                raise _error("InvalidPlacementGroup.Unknown",
                             f"The Placement Group '{missing[0]}' is unknown.")
            groups = [g for g in groups if g[key] in wanted]
    by_filter = {"group-name": "GroupName", "group-id": "GroupId", "strategy": "Strategy",
                 "state": "State"}
    for fname, values in filters.items():
        if fname in by_filter:
            groups = [g for g in groups if g[by_filter[fname]] in values]
        elif fname.startswith("tag:"):
            key = fname[4:]
            groups = [g for g in groups
                      if any(t["Key"] == key and t["Value"] in values for t in g["Tags"])]
    return ActionResult({"PlacementGroups": groups})


def delete_placement_group(self: Any) -> Any:
    from moto.core.responses import EmptyResult

    name = self._get_param("GroupName")
    self.error_on_dryrun()
    groups = _groups(self.ec2_backend)
    if name not in groups:
        raise _error("InvalidPlacementGroup.Unknown", f"The Placement Group '{name}' is unknown.")
    del groups[name]
    return EmptyResult()


def apply() -> None:
    """Add the actions to moto's EC2 responder unless moto already has them; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    from moto.ec2.responses import EC2Response

    for fn in (create_placement_group, describe_placement_groups, delete_placement_group):
        if not hasattr(EC2Response, fn.__name__):
            setattr(EC2Response, fn.__name__, fn)
    _APPLIED = True
