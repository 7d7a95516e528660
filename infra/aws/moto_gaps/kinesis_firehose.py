"""Kinesis Data Streams -> Firehose -> S3 delivery, which moto 5.2.5 lacks.

moto stores a ``KinesisStreamAsSource`` delivery stream but never reads its stream: records
put on the stream reach no S3 object. Real Firehose polls the stream and delivers buffered
batches. This fill hooks moto's Kinesis ``put_record``/``put_records`` (the backend methods,
so every client path and the API Gateway fill reach it) and feeds each record to every
delivery stream whose source is that stream. What it implements of the destination config
(``ExtendedS3DestinationConfiguration``), with AWS's semantics:

- ``BufferingHints``: a buffer per delivery stream (and per dynamic partition, as AWS keeps),
  flushed when it holds ``SizeInMBs`` or is ``IntervalInSeconds`` old (a timer thread checks
  every 0.2 s), so delivery is asynchronous and batched as on AWS; ``flush_all()`` forces it.
- ``Prefix`` / ``ErrorOutputPrefix`` with ``!{partitionKeyFromQuery:K}``, ``!{timestamp:FMT}``
  (yyyy, MM, dd, HH, mm, ss), ``!{firehose:random-string}``, ``!{firehose:error-output-type}``;
  a prefix without expressions gets AWS's default ``YYYY/MM/dd/HH/``.
- ``DynamicPartitioningConfiguration`` + a ``MetadataExtraction`` processor whose JQ query is
  an object of plain paths (``{run_id:.run_id}``); a record that is not JSON or lacks a key
  goes to the error prefix with type ``processing-failed`` (as AWS does). Other JQ is refused
  in the error output with type ``jq-unsupported`` (a gap, visible, not silently wrong).
- ``AppendDelimiterToRecord`` processor: a newline after each record.
- ``CompressionFormat`` ``GZIP`` (objects end in ``.gz``) or ``UNCOMPRESSED``; other formats are
  written uncompressed.
Object names follow AWS: ``<prefix><stream>-<version>-<yyyy-MM-dd-HH-mm-ss>-<uuid>[.gz]``.
The delivery role is not checked (moto enforces no IAM).
"""

from __future__ import annotations

import base64
import gzip
import logging
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("clusterflow.moto_gaps.kinesis_firehose")
_APPLIED = False
_lock = threading.RLock()
# (account, region, delivery stream name, partition prefix) -> buffer
_buffers: dict[tuple[str, str, str, str], _Buffer] = {}
_EXPR = re.compile(r"!\{([a-zA-Z]+):([^}]*)\}")
_JQ_OBJECT = re.compile(r"^\s*\{(.*)\}\s*$", re.S)
_JQ_FIELD = re.compile(r"^\s*\"?([A-Za-z_][A-Za-z0-9_-]*)\"?\s*:\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*$")


class _Buffer:
    def __init__(self, destination: dict[str, Any], prefix: str) -> None:
        self.destination, self.prefix = destination, prefix
        self.records: list[bytes] = []
        self.size = 0
        self.started = time.monotonic()

    def due(self, now: float) -> bool:
        hints = self.destination.get("BufferingHints") or {}
        size_limit = int(hints.get("SizeInMBs", 5)) * 1024 * 1024
        return self.size >= size_limit or now - self.started >= float(
            hints.get("IntervalInSeconds", 300))


def _processors(destination: dict[str, Any]) -> dict[str, dict[str, str]]:
    config = destination.get("ProcessingConfiguration") or {}
    if config.get("Enabled", False) not in (True, "true", "True"):
        return {}
    return {p.get("Type", ""): {x["ParameterName"]: x["ParameterValue"]
                                for x in p.get("Parameters", [])}
            for p in config.get("Processors", [])}


def _jq_fields(query: str) -> dict[str, str] | None:
    """``{a:.x, b:.y}`` -> {"a": "x", "b": "y"}; None for any other JQ."""
    m = _JQ_OBJECT.match(query)
    if not m:
        return None
    fields = {}
    for part in m.group(1).split(","):
        f = _JQ_FIELD.match(part)
        if not f:
            return None
        fields[f.group(1)] = f.group(2)
    return fields


_JAVA_TIME = (("yyyy", "%Y"), ("MM", "%m"), ("dd", "%d"), ("HH", "%H"), ("mm", "%M"),
              ("ss", "%S"))


def _expand(template: str, keys: dict[str, str], error_type: str | None, now: datetime) -> str:
    def sub(m: re.Match[str]) -> str:
        ns, name = m.group(1), m.group(2)
        if ns == "partitionKeyFromQuery":
            return keys.get(name, "")
        if ns == "timestamp":
            fmt = name
            for java, py in _JAVA_TIME:
                fmt = fmt.replace(java, py)
            return now.strftime(fmt)
        if ns == "firehose" and name == "random-string":
            return uuid.uuid4().hex[:11]
        if ns == "firehose" and name == "error-output-type":
            return error_type or ""
        return m.group(0)

    if not _EXPR.search(template):
        if template and not template.endswith("/"):
            template += "/"
        return template + now.strftime("%Y/%m/%d/%H/")
    return _EXPR.sub(sub, template)


def _route(destination: dict[str, Any], data: bytes) -> tuple[str, bytes]:
    """The S3 prefix this record goes under and its bytes as Firehose writes them."""
    import json

    now = datetime.now(timezone.utc)
    processors = _processors(destination)
    if "AppendDelimiterToRecord" in processors:
        data = data + b"\n"
    dynamic = (destination.get("DynamicPartitioningConfiguration") or {}).get("Enabled")
    keys: dict[str, str] = {}
    if dynamic and "MetadataExtraction" in processors:
        fields = _jq_fields(processors["MetadataExtraction"].get("MetadataExtractionQuery", ""))
        error = None
        if fields is None:
            error = "jq-unsupported"
        else:
            try:
                record = json.loads(data)
                keys = {k: str(record[path]) for k, path in fields.items()}
            except (ValueError, KeyError, TypeError):
                error = "processing-failed"
        if error:
            return _expand(destination.get("ErrorOutputPrefix") or "",
                           {}, error, now), data
    return _expand(destination.get("Prefix") or "", keys, None, now), data


def _write(account: str, stream_name: str, buffer: _Buffer) -> None:
    from moto.s3.models import s3_backends

    destination = buffer.destination
    body = b"".join(buffer.records)
    name = (f"{stream_name}-1-{datetime.now(timezone.utc).strftime('%Y-%m-%d-%H-%M-%S')}"
            f"-{uuid.uuid4()}")
    if (destination.get("CompressionFormat") or "UNCOMPRESSED") == "GZIP":
        body, name = gzip.compress(body), name + ".gz"
    bucket = destination["BucketARN"].split(":")[-1]
    try:
        s3_backends[account]["aws"].put_object(bucket, buffer.prefix + name, body)
    except Exception:  # noqa: BLE001 - Firehose retries and then gives up; it never fails a put
        log.exception("Firehose delivery to s3://%s/%s failed", bucket, buffer.prefix + name)


def flush_all(force: bool = True) -> None:
    """Write every buffer that is due (all of them when ``force``)."""
    now = time.monotonic()
    with _lock:
        ready = [(k, b) for k, b in _buffers.items() if force or b.due(now)]
        for key, _ in ready:
            del _buffers[key]
    for (account, _, stream_name, _), buffer in ready:
        _write(account, stream_name, buffer)


def _deliver(account: str, region: str, stream_arn: str, records: list[bytes]) -> None:
    from moto.firehose.models import firehose_backends

    try:
        streams = list(firehose_backends[account][region].delivery_streams.values())
    except KeyError:
        return
    for ds in streams:
        if (ds.delivery_stream_type != "KinesisStreamAsSource"
                or (ds.source or {}).get("KinesisStreamARN") != stream_arn):
            continue
        dest = ds.destinations[0].get("ExtendedS3") or ds.destinations[0].get("S3")
        if not dest:
            continue
        with _lock:
            for data in records:
                prefix, written = _route(dest, data)
                key = (account, region, ds.delivery_stream_name, prefix)
                buffer = _buffers.get(key)
                if buffer is None:
                    buffer = _buffers[key] = _Buffer(dest, prefix)
                buffer.records.append(written)
                buffer.size += len(written)
    flush_all(force=False)


def _timer() -> None:
    while True:
        time.sleep(0.2)
        try:
            flush_all(force=False)
        except Exception:  # noqa: BLE001 - the timer must outlive one bad buffer
            log.exception("Firehose buffer flush failed")


def apply() -> None:
    """Install the Kinesis -> Firehose hook and its flush timer; idempotent."""
    global _APPLIED
    if _APPLIED:
        return
    from moto.kinesis.models import KinesisBackend

    put_record, put_records = KinesisBackend.put_record, KinesisBackend.put_records

    def _arn(self: Any, stream_arn: str | None, stream_name: str | None) -> str:
        return self.describe_stream(stream_arn=stream_arn, stream_name=stream_name).arn

    def hooked_put_record(self: Any, stream_arn: str, stream_name: str, partition_key: str,
                          explicit_hash_key: str, data: str) -> Any:
        out = put_record(self, stream_arn, stream_name, partition_key, explicit_hash_key, data)
        _deliver(self.account_id, self.region_name, _arn(self, stream_arn, stream_name),
                 [base64.b64decode(data)])
        return out

    def hooked_put_records(self: Any, stream_arn: str, stream_name: str,
                           records: list[dict[str, Any]]) -> Any:
        out = put_records(self, stream_arn, stream_name, records)
        _deliver(self.account_id, self.region_name, _arn(self, stream_arn, stream_name),
                 [base64.b64decode(r.get("Data", "")) for r in records])
        return out

    KinesisBackend.put_record = hooked_put_record
    KinesisBackend.put_records = hooked_put_records
    threading.Thread(target=_timer, name="firehose-buffers", daemon=True).start()
    _APPLIED = True
