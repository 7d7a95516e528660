"""Where blocks and lockdowns are recorded: one DynamoDB table.

Why DynamoDB and not tags on the IP set or an S3 object: a block spans several resources
(NACL entries in every cluster subnet's ACL, an address in each WAF IP set) and NACL entries
cannot be tagged at all; WAF tags hold 50 keys of 256 characters, far too little for a
reason, an author, an expiry and the rule numbers per CIDR. An S3 object would need a
read-modify-write of one shared document for every block. DynamoDB gives one item per CIDR,
a conditional put that makes a duplicate finding a no-op even when two handlers race, and
reads that ``guard list`` and the sweep can filter by expiry. DynamoDB's own TTL is not used
for blocks: it deletes lazily (up to days late) and would forget the NACL rule numbers the
unblock needs; the sweep deletes an item only after removing what it records.

An item is either ``block#<cidr>`` (state ``pending`` while its entries are being placed,
then ``active``) or ``lockdown#<id>`` (the security-group rules a lockdown revoked and added).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget

PENDING, ACTIVE = "pending", "active"


class AlreadyBlocked(Exception):
    """The CIDR is blocked (or being blocked) already; the duplicate does nothing."""

    def __init__(self, record: BlockRecord) -> None:
        super().__init__(record.cidr)
        self.record = record


class RegistryMissing(RuntimeError):
    """The registry table does not exist: run ``clusterflow guard init`` first."""


@dataclass
class BlockRecord:
    cidr: str
    reason: str
    by: str
    created: float
    expires: float | None
    state: str = PENDING
    source: str = "cli"
    placements: list[dict[str, Any]] = field(default_factory=list)
    # While pending: until when the claimer may still be working on it (then it is abandoned).
    lease_until: float = 0.0

    @property
    def abandoned(self) -> bool:
        return self.state == PENDING and self.lease_until < time.time()

    @property
    def expired(self) -> bool:
        return self.expires is not None and self.expires <= time.time()

    def as_dict(self) -> dict[str, Any]:
        def iso(t: float | None) -> str | None:
            return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

        return {"cidr": self.cidr, "reason": self.reason, "by": self.by, "source": self.source,
                "state": self.state, "created": iso(self.created),
                "expires": iso(self.expires), "placements": self.placements}

    def _item(self) -> dict[str, Any]:
        item = {"pk": {"S": f"block#{self.cidr}"}, "kind": {"S": "block"},
                "cidr": {"S": self.cidr}, "reason": {"S": self.reason}, "by": {"S": self.by},
                "source": {"S": self.source}, "created": {"N": f"{self.created:.3f}"},
                "state": {"S": self.state}, "lease_until": {"N": f"{self.lease_until:.3f}"},
                "placements": {"S": json.dumps(self.placements)}}
        if self.expires is not None:
            item["expires"] = {"N": f"{self.expires:.3f}"}
        return item

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> BlockRecord:
        return cls(cidr=item["cidr"]["S"], reason=item["reason"]["S"], by=item["by"]["S"],
                   created=float(item["created"]["N"]),
                   expires=float(item["expires"]["N"]) if "expires" in item else None,
                   state=item["state"]["S"], source=item["source"]["S"],
                   placements=json.loads(item["placements"]["S"]),
                   lease_until=float(item.get("lease_until", {"N": "0"})["N"]))


class Registry:
    def __init__(self, aws: AwsTarget, table: str) -> None:
        self.aws, self.table = aws, table
        self._ddb = aws.client("dynamodb")

    def ensure(self) -> None:
        """Create the table (on-demand billing) if it is missing; idempotent."""
        try:
            self._ddb.create_table(
                TableName=self.table, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}])
            self._ddb.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        except ClientError as e:
            if e.response["Error"]["Code"] != "ResourceInUseException":
                raise

    def _call(self, op: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._ddb, op)(TableName=self.table, **kwargs)
        except ClientError as e:
            if e.response["Error"]["Code"] == "ResourceNotFoundException":
                raise RegistryMissing(f"the guard registry table {self.table} does not exist: "
                                      "run `clusterflow guard init`") from None
            raise

    def claim(self, record: BlockRecord, lease_s: float = 300.0) -> None:
        """Record a pending block, unless one exists (AlreadyBlocked) - the idempotency point.

        A pending claim whose holder died (its lease ran out) may be taken over.
        """
        now = time.time()
        record.lease_until = now + lease_s
        try:
            self._call("put_item", Item=record._item(),
                       ConditionExpression="attribute_not_exists(pk) OR "
                                           "(#s = :pending AND lease_until < :now)",
                       ExpressionAttributeNames={"#s": "state"},
                       ExpressionAttributeValues={":pending": {"S": PENDING},
                                                  ":now": {"N": f"{now:.3f}"}})
        except ClientError as e:
            if e.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            existing = self.get(record.cidr)
            raise AlreadyBlocked(existing or record) from None

    def progress(self, record: BlockRecord) -> None:
        """Record each placement as it is made: a claimer that dies mid-way leaves a pending
        item that lists exactly what to take back (the sweep does, once the lease is over)."""
        self._call("put_item", Item=record._item())

    def activate(self, record: BlockRecord) -> None:
        record.state, record.lease_until = ACTIVE, 0.0
        self._call("put_item", Item=record._item())

    def save(self, record: BlockRecord) -> None:
        self._call("put_item", Item=record._item())

    def release(self, cidr: str) -> None:
        self._call("delete_item", Key={"pk": {"S": f"block#{cidr}"}})

    def get(self, cidr: str) -> BlockRecord | None:
        item = self._call("get_item", Key={"pk": {"S": f"block#{cidr}"}},
                          ConsistentRead=True).get("Item")
        return BlockRecord.from_item(item) if item else None

    def _scan(self, kind: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"FilterExpression": "kind = :k",
                                  "ExpressionAttributeValues": {":k": {"S": kind}},
                                  "ConsistentRead": True}
        while True:
            page = self._call("scan", **kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def blocks(self) -> list[BlockRecord]:
        return sorted((BlockRecord.from_item(i) for i in self._scan("block")),
                      key=lambda r: r.created)

    # Lockdowns: what a lockdown changed, so its undo is exact.
    def put_lockdown(self, lockdown_id: str, doc: dict[str, Any]) -> None:
        self._call("put_item", Item={"pk": {"S": f"lockdown#{lockdown_id}"},
                                     "kind": {"S": "lockdown"}, "id": {"S": lockdown_id},
                                     "created": {"N": f"{time.time():.3f}"},
                                     "doc": {"S": json.dumps(doc)}})

    def lockdowns(self) -> list[tuple[str, float, dict[str, Any]]]:
        rows = [(i["id"]["S"], float(i["created"]["N"]), json.loads(i["doc"]["S"]))
                for i in self._scan("lockdown")]
        return sorted(rows, key=lambda r: r[1])

    def delete_lockdown(self, lockdown_id: str) -> None:
        self._call("delete_item", Key={"pk": {"S": f"lockdown#{lockdown_id}"}})
