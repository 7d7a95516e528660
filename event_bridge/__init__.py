"""clusterflow's event fabric: S3 -> EventBridge -> SNS -> SQS, and consumers for it.

The handler contract (``event_bridge.lambda_shapes``): a handler is a plain callable with the
AWS Lambda signature, ``handler(event: dict, context) -> dict | None``, so it deploys unchanged
as a Lambda function. From a queue it gets Lambda's SQS batch event
(``{"Records": [{"messageId", "receiptHandle", "body", "attributes", "messageAttributes",
"md5OfBody", "eventSource": "aws:sqs", "eventSourceARN", "awsRegion"}]}``) and answers with a
partial batch response (``{"batchItemFailures": [{"itemIdentifier": messageId}]}``); from a
topic it gets Lambda's SNS event. ``event_bridge.batch.sqs_batch_handler`` builds such a
handler from a per-record function, with per-record failures and idempotency;
``event_bridge.s3_events.parse_s3_events`` reads S3 object events in any envelope.

Modules: ``fabric`` (the topology as data, ``fabric.yaml``), ``apply`` (idempotent apply, its
steps in ``ensure_queues``, ``ensure_topics``, ``ensure_rules``, ``ensure_storage``),
``show``, ``runtime`` (Lambda's SQS event-source semantics), ``sns_invoker`` (Lambda's async
invocation from SNS), ``idempotency`` (DynamoDB dedup store), ``service`` (drain / consume),
``dlq``, ``replay``, ``run_events`` (the FIFO per-run topic), ``handlers`` (stock consumers),
``cli`` (``clusterflow events``); ``topology`` and ``consumer`` serve the pipeline's own
fan-out and consume stage.
"""
