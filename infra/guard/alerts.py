"""Every block and unblock, published to the security-alerts SNS topic.

The message is an EventBridge-shaped document (``source: clusterflow.guard``) so the fabric's
security-alert consumer and anyone subscribed to the topic read it like the CloudTrail
network-change events that share the topic.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from botocore.exceptions import ClientError

from infra.aws.clients import AwsTarget

log = logging.getLogger(__name__)
SOURCE = "clusterflow.guard"


def topic_arn(aws: AwsTarget, topic: str, account: str) -> str:
    partition = "aws-cn" if aws.region.startswith("cn-") else "aws"
    return f"arn:{partition}:sns:{aws.region}:{account}:{topic}"


def publish(aws: AwsTarget, arn: str, detail_type: str, detail: dict[str, Any]) -> str | None:
    """Publish; a failure is logged and returned (the block itself stands), never raised."""
    doc = {"version": "0", "id": str(uuid.uuid4()), "source": SOURCE,
           "detail-type": detail_type, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime()),
           "region": aws.region, "resources": [], "detail": detail}
    try:
        aws.client("sns").publish(TopicArn=arn, Message=json.dumps(doc),
                                  Subject=f"clusterflow guard: {detail_type}"[:100])
        return None
    except ClientError as e:
        msg = f"could not publish to {arn}: {e.response['Error']['Code']}"
        log.error(msg)
        return msg
