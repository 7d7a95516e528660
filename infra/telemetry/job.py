"""What the pipeline adds to a job's environment to turn telemetry on for one run.

Telemetry is off unless ``CLUSTERFLOW_TELEMETRY`` is ``kinesis`` (ranks call PutRecords with
the job's AWS credentials) or ``apigateway`` (ranks post to the API with its key; for nodes
without AWS credentials). The path is provisioned on first use and the run is registered so
its records are not flagged as an unknown run's.
"""

from __future__ import annotations

import logging
import os

from infra.aws.clients import EMBEDDED_CREDENTIALS, AwsTarget
from infra.telemetry.provision import TelemetryConfig, ensure_telemetry, register_run

MODE_ENV = "CLUSTERFLOW_TELEMETRY"
MODES = ("off", "kinesis", "apigateway")
BUFFER_ENV = "CLUSTERFLOW_TELEMETRY_BUFFER_SECONDS"  # Firehose's interval, when it is created


class TelemetryModeError(ValueError):
    """``CLUSTERFLOW_TELEMETRY`` holds something else than off/kinesis/apigateway."""


def telemetry_env(aws: AwsTarget, run_id: str, bucket: str | None = None,
                  mode: str | None = None, cfg: TelemetryConfig | None = None,
                  ) -> dict[str, str]:
    """Env vars for the job's ranks (``{}`` when telemetry is off); delivery into ``bucket``."""
    mode = (mode if mode is not None else os.environ.get(MODE_ENV, "off")).strip().lower()
    if mode in ("", "off", "0", "false"):
        return {}
    if mode not in MODES:
        raise TelemetryModeError(f"{MODE_ENV}={mode!r}: use one of {', '.join(MODES)}")
    if cfg is None:
        buffer = os.environ.get(BUFFER_ENV, "")
        extra = {"buffer_seconds": int(buffer)} if buffer.isdigit() else {}
        cfg = TelemetryConfig.for_bucket(bucket, **extra) if bucket else TelemetryConfig(**extra)
    try:
        endpoints = ensure_telemetry(aws, cfg)
        register_run(aws, endpoints, run_id)
    except Exception as e:  # noqa: BLE001 - telemetry never stops a run
        logging.getLogger(__name__).warning(
            "telemetry is off for run %s: setting up %s failed: %s: %s", run_id, mode,
            type(e).__name__, e)
        return {}
    env = {"CLUSTERFLOW_RUN_ID": run_id}
    for name in ("CLUSTERFLOW_TELEMETRY_EVERY", "CLUSTERFLOW_TELEMETRY_MIN_SECONDS"):
        if os.environ.get(name):  # the sampling a user asked for reaches remote ranks too
            env[name] = os.environ[name]
    if mode == "kinesis":
        env["CLUSTERFLOW_TELEMETRY_STREAM"] = endpoints.stream
        env["CLUSTERFLOW_TELEMETRY_REGION"] = aws.region
        if aws.endpoint_url:
            env["CLUSTERFLOW_TELEMETRY_ENDPOINT"] = aws.endpoint_url
        if aws.embedded:  # the throw-away keys the embedded endpoint gets, never real ones
            env.update(AWS_ACCESS_KEY_ID=EMBEDDED_CREDENTIALS["aws_access_key_id"],
                       AWS_SECRET_ACCESS_KEY=EMBEDDED_CREDENTIALS["aws_secret_access_key"])
    else:
        env["CLUSTERFLOW_TELEMETRY_URL"] = endpoints.stage_url
        env["CLUSTERFLOW_TELEMETRY_API_KEY"] = endpoints.api_key
    return env
