"""Keep other specs' grants when a fabric rewrites a shared topic or queue policy.

Topics and queues are shared by name between specs (every spec's fan-out publishes to
``clusterflow-results``), and a policy is one document: writing only this fabric's senders
would revoke the rule another spec created for its own bucket, and on AWS that rule could no
longer publish (moto does not enforce policies, so nothing would show it there). So a policy
is this fabric's grants plus those already present whose source still exists; a grant for a
deleted rule, topic or bucket is dropped, which keeps the policy least-privilege.
"""

from __future__ import annotations

import json

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget

_GONE = {"ResourceNotFoundException", "NotFound", "NotFoundException", "404", "NoSuchBucket"}


def granted(policy: str | None) -> dict[str, list[str]]:
    """Service principal -> the source ARNs a policy lets it send or publish from."""
    try:
        doc = json.loads(policy) if policy else {}
    except ValueError:
        return {}
    out: dict[str, list[str]] = {}
    for st in doc.get("Statement", []) if isinstance(doc, dict) else []:
        if not isinstance(st, dict) or st.get("Effect") != "Allow":
            continue
        service = (st.get("Principal") or {}).get("Service")
        arns = ((st.get("Condition") or {}).get("ArnEquals") or {}).get("aws:SourceArn")
        if isinstance(service, str) and arns:
            out.setdefault(service, []).extend([arns] if isinstance(arns, str) else arns)
    return out


class LiveSources:
    """Whether a grant's source ARN (an EventBridge rule, SNS topic, S3 bucket) still exists."""

    def __init__(self, aws: AwsTarget) -> None:
        self.aws = aws
        self._seen: dict[str, bool] = {}

    def __call__(self, arn: str) -> bool:
        if arn not in self._seen:
            self._seen[arn] = self._exists(arn)
        return self._seen[arn]

    def _exists(self, arn: str) -> bool:
        parts = arn.split(":", 5)
        if len(parts) < 6:
            return False
        service, resource = parts[2], parts[5]
        try:
            if service == "events" and resource.startswith("rule/"):
                path = resource[len("rule/"):].split("/")
                bus, name = (path[0], path[1]) if len(path) == 2 else ("default", path[0])
                self.aws.client("events").describe_rule(Name=name, EventBusName=bus)
            elif service == "sns":
                self.aws.client("sns").get_topic_attributes(TopicArn=arn)
            elif service == "s3":
                self.aws.client("s3").head_bucket(Bucket=resource)
            # Anything else is not ours to judge: keep it.
        except ClientError as e:
            if e.response["Error"]["Code"] in _GONE:
                return False
            raise
        return True


def merged(ours: dict[str, list[str]], current: str | None,
           live: LiveSources) -> dict[str, list[str]]:
    """This fabric's grants plus the live ones already in ``current``, sorted, no repeats."""
    out = {service: set(arns) for service, arns in ours.items()}
    for service, arns in granted(current).items():
        for arn in arns:
            if arn not in out.get(service, set()) and live(arn):
                out.setdefault(service, set()).add(arn)
    return {service: sorted(arns) for service, arns in out.items()}
