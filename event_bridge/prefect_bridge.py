"""Bridge S3 "Object Created" events to Prefect events, as a Lambda-signature SQS handler.

``handler(event, context)`` takes an SQS batch in Lambda's shape and answers with a partial
batch response, so the same function runs under the fabric's consumer runtime
(``clusterflow events consume``, started by ``clusterflow local up``) or as an AWS Lambda with
an SQS event source. For each created object it recognises it emits one Prefect event::

    event:    s3.object.created
    resource: prefect.resource.id = s3.object.<bucket>/<key>
              s3.bucket, s3.key, clusterflow.role = input | result, clusterflow.run-id

and the deployments' ``DeploymentEventTrigger``s (``prefect.yaml``) start the matching flow:
a ``.npy`` uploaded under the input bucket's uploads prefix (``inputs/uploads/`` by default)
starts ``hpc-pipeline/on-upload``; a run's ``manifest.json`` in the results bucket starts
``postprocess/on-result``. Other objects are acknowledged and ignored.

Exactly once, in two layers:

* the fabric's dedup store (DynamoDB conditional put, ``event_bridge.idempotency``) claims
  each S3 write before the event is emitted and records it after, for ``retention_days``:
  SQS redelivery, a consumer killed mid-batch, EventBridge replays;
* the Prefect event's id is a UUID5 of the S3 write's identity, and the Prefect server drops
  an event whose id it saw in the last 5 minutes (an in-memory cache of 1,000 ids, lost on a
  server restart). That covers the gap where an event was sent but the handler died before
  recording it.

Why not ``prefect.events.emit_event``: it hands the event to a background worker that logs
and drops failures, so a handler could acknowledge a message whose event never arrived.
Here each event goes through Prefect's events client with a checkpoint (a websocket ping
answered by the server) after the send, and only then is the message acknowledged.

Where the events go: ``PREFECT_API_URL``, else the Prefect server of a running
``clusterflow local up`` stack. Never Prefect's ephemeral server: with neither set, Prefect
would start a throw-away server, the events would land there (no trigger ever fires) and the
messages would be acknowledged and recorded as processed, so a later replay would skip them.
With no server to reach the record fails instead: SQS retries it and finally dead-letters it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from event_bridge.batch import sqs_batch_handler
from event_bridge.consumer import PoisonMessage
from event_bridge.s3_events import NotAnS3Event, S3ObjectEvent, parse_s3_events

if TYPE_CHECKING:
    from prefect.events import Event

    from flows.spec import PipelineSpec

logger = logging.getLogger(__name__)


class PrefectUnavailable(RuntimeError):
    """No Prefect API to send to; the record must fail (retried, then the DLQ), not be acked."""

EVENT_NAME = "s3.object.created"
# Fixed namespace: the same S3 write must map to the same Prefect event id everywhere.
EVENT_ID_NAMESPACE = uuid.UUID("5b0a3c52-6f0e-4d0e-9a52-c1f7e2a9b6d4")

Role = Literal["input", "result"]


class BridgeConfig(BaseModel):
    """Which objects are uploads and which are results; a Lambda's environment.

    Uploads live under their own prefix (default ``<input prefix>uploads/``): the pipeline
    caches its generated initial conditions under the input prefix too, and those must not
    start on-upload runs.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_bucket: str
    input_prefix: str = "inputs/"
    upload_prefix: str | None = None
    results_bucket: str
    results_prefix: str = "runs/"
    manifest_name: str = "manifest.json"

    @property
    def uploads(self) -> str:
        if self.upload_prefix is not None:
            return self.upload_prefix
        return f"{self.input_prefix}uploads/"

    @classmethod
    def for_spec(cls, spec: PipelineSpec) -> BridgeConfig:
        return cls(input_bucket=spec.storage.input_bucket,
                   input_prefix=spec.storage.input_prefix,
                   results_bucket=spec.storage.results_bucket,
                   results_prefix=spec.storage.results_prefix)

    @classmethod
    def from_spec(cls, spec_path: str | Path | None = None) -> BridgeConfig:
        from flows.spec import DEFAULT_SPEC, load_spec

        return cls.for_spec(load_spec(spec_path or DEFAULT_SPEC))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> BridgeConfig:
        """``CLUSTERFLOW_SPEC`` (default: the bundled spec), then per-field overrides.

        On Lambda, set ``CLUSTERFLOW_INPUT_BUCKET`` and ``CLUSTERFLOW_RESULTS_BUCKET`` (and
        ``CLUSTERFLOW_INPUT_PREFIX``, ``CLUSTERFLOW_UPLOAD_PREFIX``,
        ``CLUSTERFLOW_RESULTS_PREFIX`` if they differ from ``inputs/``, ``inputs/uploads/``
        and ``runs/``).
        """
        env = os.environ if environ is None else environ
        overrides = {
            name: env[var] for name, var in (
                ("input_bucket", "CLUSTERFLOW_INPUT_BUCKET"),
                ("input_prefix", "CLUSTERFLOW_INPUT_PREFIX"),
                ("upload_prefix", "CLUSTERFLOW_UPLOAD_PREFIX"),
                ("results_bucket", "CLUSTERFLOW_RESULTS_BUCKET"),
                ("results_prefix", "CLUSTERFLOW_RESULTS_PREFIX"),
            ) if env.get(var)
        }
        if {"input_bucket", "results_bucket"} <= overrides.keys():
            return cls(**overrides)
        return cls.from_spec(env.get("CLUSTERFLOW_SPEC")).model_copy(update=overrides)

    def role_of(self, bucket: str, key: str) -> Role | None:
        if bucket == self.input_bucket and key.startswith(self.uploads):
            return "input"
        if (bucket == self.results_bucket and key.startswith(self.results_prefix)
                and key.rsplit("/", 1)[-1] == self.manifest_name):
            return "result"
        return None


def prefect_event_id(obj: S3ObjectEvent) -> uuid.UUID:
    """The same S3 write is the same Prefect event, however often and however delivered."""
    return uuid.uuid5(EVENT_ID_NAMESPACE, obj.identity)


def to_prefect_event(obj: S3ObjectEvent, config: BridgeConfig) -> Event | None:
    """The Prefect event for one S3 object event, or None if no deployment cares about it."""
    from prefect.events import Event

    role = config.role_of(obj.bucket, obj.key) if obj.created else None
    if role is None:
        return None
    resource = {
        "prefect.resource.id": f"s3.object.{obj.bucket}/{obj.key}",
        "prefect.resource.name": obj.uri,
        "s3.bucket": obj.bucket,
        "s3.key": obj.key,
        "clusterflow.role": role,
    }
    if role == "result":
        resource["clusterflow.run-id"] = obj.key[len(config.results_prefix):].split("/")[0]
    return Event(
        id=prefect_event_id(obj),
        event=EVENT_NAME,
        resource=resource,
        related=[{"prefect.resource.id": f"s3.bucket.{obj.bucket}",
                  "prefect.resource.role": "bucket"}],
        payload={"s3": {"identity": obj.identity, "event_id": obj.event_id, "size": obj.size,
                        "etag": obj.etag, "time": obj.time, "kind": obj.kind,
                        "replay_name": obj.replay_name}},
    )


def prefect_api_url() -> str:
    """``PREFECT_API_URL``, else the local stack's recorded server; never an ephemeral one."""
    from prefect.settings import PREFECT_API_URL

    from infra.aws.embedded import state_dir

    url = PREFECT_API_URL.value()
    if url:
        return str(url)
    try:
        url = json.loads((state_dir() / "prefect.json").read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        url = None
    if isinstance(url, str) and url:
        return url
    raise PrefectUnavailable(
        "no Prefect API to send the event to: set PREFECT_API_URL or start `clusterflow local "
        "up`; the message is retried and then dead-lettered, not acknowledged")


async def _send(events: list[Event], api_url: str) -> None:
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # checkpoint_every=1: each send is followed by a ping the server must answer, so a
    # return means the server has the event. Few reconnections: SQS retries the message.
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        async with get_events_client(reconnection_attempts=2, checkpoint_every=1) as client:
            for event in events:
                await client.emit(event)


def emit(events: list[Event]) -> None:
    """Send events to the Prefect API (see ``prefect_api_url``); raises unless all arrived."""
    from prefect.utilities.asyncutils import run_coro_as_sync

    if events:
        run_coro_as_sync(_send(events, prefect_api_url()))


def prefect_events(body: str, config: BridgeConfig) -> list[Event]:
    """The Prefect events one SQS message body calls for (``[]``: nothing to start)."""
    try:
        objects = parse_s3_events(body)
    except NotAnS3Event as e:
        raise PoisonMessage(str(e)) from None
    return [e for e in (to_prefect_event(o, config) for o in objects) if e is not None]


_config: BridgeConfig | None = None


def _bridge_config() -> BridgeConfig:
    global _config
    if _config is None:  # once per process, as a Lambda reads its environment at cold start
        _config = BridgeConfig.from_env()
    return _config


def dedup_key(record: dict[str, Any]) -> str:
    """What a record is processed once for: the Prefect events it calls for.

    Narrower than the fabric's default key (the S3 write), which an "Object Tags Added"
    event for the same write shares with its "Object Created" one.
    """
    try:
        events = prefect_events(record["body"], _bridge_config())
    except PoisonMessage:
        events = []
    return "|".join(str(e.id) for e in events) or f"sqs:{record['messageId']}"


def _bridge(record: dict[str, Any], context: Any) -> None:
    events = prefect_events(record["body"], _bridge_config())
    emit(events)
    for event in events:
        logger.info("emitted %s for %s (%s)", event.event, event.resource.id, event.id)


# The fabric's batch handler: per-record partial batch failures, and each record claimed in
# the dedup store (scoped by consumer) so a duplicate is acknowledged without a second event.
handler = sqs_batch_handler(_bridge, key=dedup_key)
handler.__doc__ = "Lambda entry point (SQS event source with ReportBatchItemFailures)."
