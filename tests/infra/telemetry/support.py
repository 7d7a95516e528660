"""Shared helpers: a fresh telemetry path per test on the session's moto server."""

from __future__ import annotations

import gzip
import json
import time
import uuid
from typing import Any

from infra.aws.clients import AwsTarget
from infra.telemetry.provision import TelemetryConfig, TelemetryEndpoints, ensure_telemetry


def fresh(aws: AwsTarget, **overrides: Any) -> tuple[TelemetryConfig, TelemetryEndpoints]:
    tag = uuid.uuid4().hex[:8]
    fields: dict[str, Any] = {"stream": f"tele-{tag}", "delivery_stream": f"tele-{tag}-s3",
                              "bucket": f"tele-{tag}", "api_name": f"tele-{tag}",
                              "buffer_seconds": 1}
    cfg = TelemetryConfig(**{**fields, **overrides})
    return cfg, ensure_telemetry(aws, cfg)


def objects(aws: AwsTarget, bucket: str, prefix: str = "") -> list[str]:
    out = aws.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in out.get("Contents", []))


def delivered(aws: AwsTarget, bucket: str, prefix: str, want: int,
              timeout: float = 20.0) -> list[dict[str, Any]]:
    """Records Firehose wrote under ``prefix``, waiting for at least ``want`` of them."""
    s3 = aws.client("s3")
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for key in objects(aws, bucket, prefix):
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            if key.endswith(".gz"):
                body = gzip.decompress(body)
            records += [json.loads(line) for line in body.splitlines() if line.strip()]
        if len(records) >= want or time.monotonic() > deadline:
            return records
        time.sleep(0.3)
