"""Per-run lifecycle events on a FIFO topic: ordered per run, deduplicated per stage.

A run's stages (provisioned, staged, computed, published, ...) must reach consumers in the
order they happened; runs are independent of each other. A FIFO topic gives exactly that
with ``MessageGroupId`` = run id (ordering within a run, parallelism across runs) and
``MessageDeduplicationId`` = run id + stage (a retried publish of the same stage within five
minutes is dropped by SNS instead of being delivered twice). The body is EventBridge-shaped,
so consumers and the dedup store treat it like every other event.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from event_bridge.s3_events import unwrap_sns
from infra.aws.clients import AwsTarget

SOURCE = "clusterflow.pipeline"
DETAIL_TYPE = "Run Stage Reached"


class BadRunEvent(ValueError):
    """A message on the run-events queue that is not a run event."""


def run_event(run_id: str, stage: str, detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "version": "0", "id": f"{run_id}:{stage}", "source": SOURCE,
        "detail-type": DETAIL_TYPE,
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "detail": {"run_id": run_id, "stage": stage, **(detail or {})},
    }


def _dedup_id(run_id: str, stage: str) -> str:
    raw = f"{run_id}:{stage}"
    # SNS allows 128 characters from [A-Za-z0-9!-/:-@[-`{-~]; hash anything longer.
    return raw if len(raw) <= 128 else hashlib.sha256(raw.encode()).hexdigest()


def publish_run_event(aws: AwsTarget, topic_arn: str, run_id: str, stage: str,
                      detail: dict[str, Any] | None = None) -> str:
    """Publish one stage of one run; returns the SNS message id."""
    event = run_event(run_id, stage, detail)
    return aws.client("sns").publish(
        TopicArn=topic_arn, Message=json.dumps(event), MessageGroupId=run_id,
        MessageDeduplicationId=_dedup_id(run_id, stage))["MessageId"]


def parse_run_event(body: str) -> dict[str, Any]:
    try:
        doc = unwrap_sns(json.loads(body))
        if doc["source"] != SOURCE or doc["detail-type"] != DETAIL_TYPE:
            raise BadRunEvent(f"not a run event: source {doc['source']!r}")
        detail = doc["detail"]
        if not (isinstance(detail["run_id"], str) and isinstance(detail["stage"], str)):
            raise BadRunEvent("run_id and stage must be strings")
        return doc
    except BadRunEvent:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadRunEvent(f"not a run event: {type(e).__name__}: {e}") from None
