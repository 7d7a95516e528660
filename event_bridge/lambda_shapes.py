"""The AWS Lambda contract, so a clusterflow handler deploys unchanged as a Lambda function.

A handler is ``handler(event: dict, context) -> dict | None``. It receives exactly what Lambda
would pass it:

* from an SQS queue: ``{"Records": [{"messageId", "receiptHandle", "body", "attributes",
  "messageAttributes", "md5OfBody", "eventSource": "aws:sqs", "eventSourceARN",
  "awsRegion"}]}``, and answers with a partial batch response
  ``{"batchItemFailures": [{"itemIdentifier": messageId}, ...]}`` (``None`` or no failures:
  the whole batch succeeded; an exception: the whole batch failed);
* from an SNS topic: ``{"Records": [{"EventSource": "aws:sns", "EventVersion": "1.0",
  "EventSubscriptionArn", "Sns": {...}}]}``; an exception is a failed invocation.

The context has Lambda's attributes and methods. clusterflow adds two that Lambda does not
have, read through :func:`aws_for` and :func:`dedup_table_for` so the same handler falls back
to the environment (``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``CLUSTERFLOW_DEDUP_TABLE``) when it
runs inside Lambda.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from infra.aws.clients import AwsTarget

Handler = Callable[[dict[str, Any], Any], "dict[str, Any] | None"]

DEFAULT_DEDUP_TABLE = "clusterflow-dedup"


@dataclass
class LambdaContext:
    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int = 128
    function_version: str = "$LATEST"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    log_group_name: str = ""
    log_stream_name: str = ""
    timeout_s: float = 300.0
    started: float = field(default_factory=time.monotonic)
    # clusterflow's additions (absent in Lambda; see aws_for / dedup_table_for).
    aws: AwsTarget | None = None
    dedup_table: str | None = None

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self.started)) * 1000))


def new_context(function_name: str, region: str, timeout_s: float, aws: AwsTarget | None,
                dedup_table: str | None, account: str = "123456789012") -> LambdaContext:
    return LambdaContext(
        function_name=function_name,
        invoked_function_arn=f"arn:aws:lambda:{region}:{account}:function:{function_name}",
        log_group_name=f"/aws/lambda/{function_name}", timeout_s=timeout_s, aws=aws,
        dedup_table=dedup_table,
    )


def aws_for(context: Any) -> AwsTarget:
    """Where a handler's own AWS calls go: the consumer's target, or Lambda's environment."""
    target = getattr(context, "aws", None)
    if isinstance(target, AwsTarget):
        return target
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return AwsTarget(region=region, endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def dedup_table_for(context: Any) -> str:
    return (getattr(context, "dedup_table", None) or os.environ.get("CLUSTERFLOW_DEDUP_TABLE")
            or DEFAULT_DEDUP_TABLE)


def _message_attributes(attrs: dict[str, Any]) -> dict[str, Any]:
    """boto3's MessageAttributes in Lambda's camel-case shape (binary as base64 text)."""
    out = {}
    for name, a in attrs.items():
        binary = a.get("BinaryValue")
        out[name] = {
            "stringValue": a.get("StringValue"),
            "binaryValue": base64.b64encode(binary).decode() if binary is not None else None,
            "stringListValues": list(a.get("StringListValues", [])),
            "binaryListValues": [base64.b64encode(b).decode()
                                 for b in a.get("BinaryListValues", [])],
            "dataType": a.get("DataType", "String"),
        }
    return out


def sqs_record(message: dict[str, Any], queue_arn: str, region: str) -> dict[str, Any]:
    """One received SQS message as the record Lambda's SQS event source passes."""
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": dict(message.get("Attributes", {})),
        "messageAttributes": _message_attributes(message.get("MessageAttributes", {})),
        "md5OfBody": message.get("MD5OfBody", ""),
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": region,
    }


def sns_event(envelope: dict[str, Any], subscription_arn: str) -> dict[str, Any]:
    """An SNS notification (the JSON SNS POSTs to an endpoint) as Lambda's SNS event."""
    sns = {k: envelope.get(k) for k in (
        "Type", "MessageId", "TopicArn", "Subject", "Message", "Timestamp", "SignatureVersion",
        "Signature")}
    sns["SigningCertUrl"] = envelope.get("SigningCertURL")
    sns["UnsubscribeUrl"] = envelope.get("UnsubscribeURL")
    sns["MessageAttributes"] = {
        name: {"Type": a.get("Type"), "Value": a.get("Value")}
        for name, a in (envelope.get("MessageAttributes") or {}).items()
    }
    return {"Records": [{"EventSource": "aws:sns", "EventVersion": "1.0",
                         "EventSubscriptionArn": subscription_arn, "Sns": sns}]}


def on_failure_record(event: dict[str, Any], context: LambdaContext, attempts: int,
                      error: BaseException) -> dict[str, Any]:
    """What Lambda sends to an on-failure destination after its async retries ran out."""
    return {
        "version": "1.0",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "requestContext": {
            "requestId": context.aws_request_id,
            "functionArn": f"{context.invoked_function_arn}:$LATEST",
            "condition": "RetriesExhausted",
            "approximateInvokeCount": attempts,
        },
        "requestPayload": event,
        "responseContext": {"statusCode": 200, "executedVersion": "$LATEST",
                            "functionError": "Unhandled"},
        "responsePayload": {"errorMessage": str(error), "errorType": type(error).__name__},
    }


def failed_ids(response: Any, batch_ids: list[str]) -> set[str] | None:
    """The message ids a partial batch response reports failed; None means the whole batch.

    Lambda's rules: no response or an empty list is success; an identifier that is empty,
    null or not in the batch, or a malformed response, fails the whole batch.
    """
    if response is None:
        return set()
    if not isinstance(response, dict):
        return None
    failures = response.get("batchItemFailures")
    if failures is None:
        return set()
    if not isinstance(failures, list):
        return None
    ids: set[str] = set()
    known = set(batch_ids)
    for item in failures:
        ident = item.get("itemIdentifier") if isinstance(item, dict) else None
        if not ident or ident not in known:
            return None
        ids.add(ident)
    return ids
