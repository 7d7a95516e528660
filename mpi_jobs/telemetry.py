"""Run telemetry from inside a job: each rank reports its progress without ever slowing it.

Records go in batches to Kinesis Data Streams (``PutRecords``; nodes with AWS credentials) or
to clusterflow's API Gateway endpoint (``POST {url}/runs/{run}/records`` with an API key; nodes
without credentials). Firehose then delivers the stream to S3 under
``telemetry/run_id=<id>/``. The pipeline switches telemetry on for a job by setting:

``CLUSTERFLOW_RUN_ID``                the run the records belong to
``CLUSTERFLOW_TELEMETRY_STREAM``      Kinesis stream name (direct mode), or
``CLUSTERFLOW_TELEMETRY_URL``         API stage URL, e.g. ``https://ID.execute-api.REGION.amazonaws.com/v1``
``CLUSTERFLOW_TELEMETRY_API_KEY``     the API key for the URL
``CLUSTERFLOW_TELEMETRY_ENDPOINT``    optional AWS endpoint URL for Kinesis (the embedded endpoint)
``CLUSTERFLOW_TELEMETRY_REGION``      optional region for Kinesis (else the AWS default)
``CLUSTERFLOW_TELEMETRY_EVERY``       report at most every N-th step (default 1)
``CLUSTERFLOW_TELEMETRY_MIN_SECONDS`` and at most every S seconds (default 0.2; 0 = every step)

With none of the first three set, every call here is a no-op. A user's own step reports with::

    from mpi_jobs.telemetry import report
    report(step=i, seconds=dt, phase="assemble")      # any JSON-able fields

Why a thread and a bounded queue: the rank only appends to a ``queue.Queue`` (microseconds);
a daemon thread batches and sends. A full queue, a down endpoint, throttling (HTTP 429 or
Kinesis ``ProvisionedThroughputExceeded``) or a rejected batch *drops* records and counts
them, because a progress report is never worth a slower or failed job. After a failed send
the thread stops sending for a back-off period (dropping meanwhile) so a dead endpoint costs
one connection attempt per period, not one per batch. Stdlib + boto3 only: ranks must not
import ``infra``/``flows``.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import resource
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

MAX_RECORDS_PER_CALL = 500  # Kinesis PutRecords limits
MAX_BYTES_PER_CALL = 5 * 1024 * 1024
MAX_RECORD_BYTES = 1024 * 1024
ENV_RUN = "CLUSTERFLOW_RUN_ID"
ENV_STREAM = "CLUSTERFLOW_TELEMETRY_STREAM"
ENV_URL = "CLUSTERFLOW_TELEMETRY_URL"
ENV_KEY = "CLUSTERFLOW_TELEMETRY_API_KEY"
ENV_ENDPOINT = "CLUSTERFLOW_TELEMETRY_ENDPOINT"
ENV_REGION = "CLUSTERFLOW_TELEMETRY_REGION"
ENV_EVERY = "CLUSTERFLOW_TELEMETRY_EVERY"
ENV_MIN_SECONDS = "CLUSTERFLOW_TELEMETRY_MIN_SECONDS"
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID",
              "AWS_BATCH_JOB_NODE_INDEX")


class Reporter:
    """Batches records of one rank to Kinesis or the API; never raises, never blocks."""

    def __init__(self, run_id: str, rank: int, *, stream: str | None = None,
                 url: str | None = None, api_key: str | None = None,
                 endpoint_url: str | None = None, region: str | None = None,
                 queue_size: int = 20_000, flush_seconds: float = 0.5,
                 backoff_seconds: float = 5.0, timeout: float = 2.0) -> None:
        if not (stream or url):
            raise ValueError("a Reporter needs a Kinesis stream name or an API URL")
        self.run_id, self.rank = run_id, rank
        self.stream, self.url, self.api_key = stream, url.rstrip("/") if url else None, api_key
        self.endpoint_url, self.region, self.timeout = endpoint_url, region, timeout
        self.flush_seconds, self.backoff_seconds = flush_seconds, backoff_seconds
        self.host = socket.gethostname()
        self.counts = {"queued": 0, "sent": 0, "dropped_queue_full": 0, "dropped_send_failed": 0,
                       "dropped_throttled": 0, "dropped_rejected": 0, "dropped_oversize": 0}
        self.last_error: str | None = None
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self._client: Any = None
        self._down_until = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="clusterflow-telemetry",
                                        daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("dropped_"))

    @property
    def transport(self) -> str:
        return "kinesis" if self.stream else "apigateway"

    def report(self, **fields: Any) -> None:
        """Queue one record (run id, rank, host, time added); drops it when the queue is full."""
        if self._closed:
            return
        record = {"run_id": self.run_id, "rank": self.rank, "host": self.host,
                  "time": time.time(), **fields}
        try:
            data = json.dumps(record, separators=(",", ":"), default=str).encode()
        except (TypeError, ValueError):
            self.counts["dropped_rejected"] += 1
            return
        if len(data) + len(self._partition_key) > MAX_RECORD_BYTES:
            self.counts["dropped_oversize"] += 1
            return
        try:
            self._queue.put_nowait(data)
            self.counts["queued"] += 1
        except queue.Full:
            self.counts["dropped_queue_full"] += 1

    def close(self, timeout: float = 5.0) -> dict[str, Any]:
        """Flush what is queued (at most ``timeout`` seconds), stop, and return the counters."""
        if not self._closed:
            self._closed = True
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            while True:  # whatever the thread could not send in time is dropped, and counted
                try:
                    if self._queue.get_nowait() is not None:
                        self.counts["dropped_send_failed"] += 1
                except queue.Empty:
                    break
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {"transport": self.transport, **self.counts, "dropped": self.dropped,
                "last_error": self.last_error}

    # -- sender thread -------------------------------------------------------------------

    @property
    def _partition_key(self) -> str:
        return f"{self.run_id}-{self.rank}"

    def _loop(self) -> None:
        batch: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.flush_seconds
        stop = False
        while not stop:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = b""
            if item is None:
                stop = True
            elif item:
                if len(batch) == MAX_RECORDS_PER_CALL or size + len(item) > MAX_BYTES_PER_CALL:
                    self._send(batch)
                    batch, size = [], 0
                batch.append(item)
                size += len(item) + len(self._partition_key)
                if time.monotonic() < deadline:
                    continue
            if batch:
                self._send(batch)
                batch, size = [], 0
            deadline = time.monotonic() + self.flush_seconds

    def _send(self, batch: list[bytes]) -> None:
        if time.monotonic() < self._down_until:
            self.counts["dropped_send_failed"] += len(batch)
            return
        try:
            if self.stream:
                self._put_kinesis(batch)
            else:
                self._post_api(batch)
        except Exception as e:  # noqa: BLE001 - telemetry never fails the job
            self.counts["dropped_send_failed"] += len(batch)
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            self._down_until = time.monotonic() + self.backoff_seconds

    def _put_kinesis(self, batch: list[bytes]) -> None:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "kinesis", region_name=self.region, endpoint_url=self.endpoint_url,
                config=Config(retries={"max_attempts": 1}, connect_timeout=self.timeout,
                              read_timeout=self.timeout))
        out = self._client.put_records(StreamName=self.stream, Records=[
            {"Data": data, "PartitionKey": self._partition_key} for data in batch])
        failed = [r for r in out.get("Records", []) if r.get("ErrorCode")]
        throttled = sum(r["ErrorCode"] == "ProvisionedThroughputExceededException"
                        for r in failed)
        self.counts["dropped_throttled"] += throttled
        self.counts["dropped_send_failed"] += len(failed) - throttled
        self.counts["sent"] += len(batch) - len(failed)

    def _post_api(self, batch: list[bytes]) -> None:
        body = b'{"records":[' + b",".join(batch) + b"]}"
        req = urllib.request.Request(
            f"{self.url}/runs/{urllib.parse.quote(self.run_id, safe='')}/records",
            data=body, method="POST",
            headers={"Content-Type": "application/json", "x-api-key": self.api_key or ""})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                out = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            reason = e.read()[:300].decode(errors="replace")
            self.last_error = f"HTTP {e.code}: {reason}"
            key = "dropped_throttled" if e.code == 429 else (
                "dropped_rejected" if 400 <= e.code < 500 else "dropped_send_failed")
            self.counts[key] += len(batch)
            if e.code >= 500 or e.code == 429:
                self._down_until = time.monotonic() + min(1.0, self.backoff_seconds)
            return
        failed = int(out.get("FailedRecordCount", 0) or 0)
        self.counts["dropped_throttled"] += failed
        self.counts["sent"] += len(batch) - failed


def rank_from_env() -> int:
    for name in _RANK_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 0


def from_env(rank: int | None = None) -> Reporter | None:
    """The Reporter the pipeline configured for this process, or None when telemetry is off."""
    stream, url = os.environ.get(ENV_STREAM), os.environ.get(ENV_URL)
    run_id = os.environ.get(ENV_RUN)
    if not run_id or not (stream or url):
        return None
    return Reporter(run_id, rank_from_env() if rank is None else rank, stream=stream or None,
                    url=None if stream else url, api_key=os.environ.get(ENV_KEY),
                    endpoint_url=os.environ.get(ENV_ENDPOINT) or None,
                    region=os.environ.get(ENV_REGION) or os.environ.get("AWS_DEFAULT_REGION"))


_default: Reporter | None = None
_default_lock = threading.Lock()
_default_tried = False


def report(**fields: Any) -> None:
    """Report one record from a user's step (a no-op unless the pipeline turned telemetry on)."""
    global _default, _default_tried
    if not _default_tried:
        with _default_lock:
            if not _default_tried:
                _default = from_env()
                if _default is not None:
                    atexit.register(_default.close)
                _default_tried = True
    if _default is not None:
        _default.report(**fields)


def halo_bytes(cart: Any, local_shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes this rank sends per halo exchange: one face per existing neighbour and axis."""
    total = 0
    interior = [n - 2 for n in local_shape]
    for axis in range(len(local_shape)):
        face = itemsize
        for other, n in enumerate(interior):
            if other != axis:
                face *= n
        for disp in (-1, 1):
            _, dest = cart.Shift(axis, disp)
            if dest >= 0:  # MPI.PROC_NULL is negative
                total += face
    return total


class StepReporter:
    """The callback a kernel's time-step loop calls; it emits one record per block of steps.

    ``step(n, waited)`` measures seconds since the previous record itself, so the kernel adds
    only the halo-wait timing it alone can see. A record covers the steps since the previous
    one (``steps``; ``seconds``/``wait_seconds`` are means per step) and is emitted when ``n``
    is a multiple of ``every`` *and* at least ``min_seconds`` have passed: with short steps a
    record per step would cost more than the 2% budget (tens of microseconds each), so by
    default a rank reports at most 5 times a second. ``close()`` reports the last block.
    """

    def __init__(self, reporter: Reporter, kernel: str, bytes_per_step: int = 0,
                 every: int = 1, min_seconds: float = 0.2) -> None:
        self.reporter, self.kernel = reporter, kernel
        self.bytes_per_step, self.every = bytes_per_step, max(1, every)
        self.min_seconds = max(0.0, min_seconds)
        self._last = time.perf_counter()
        self._waited = 0.0
        self._steps = 0
        self._step = 0

    @classmethod
    def from_env(cls, rank: int, kernel: str, bytes_per_step: int = 0) -> StepReporter | None:
        reporter = from_env(rank)
        if reporter is None:
            return None
        every = os.environ.get(ENV_EVERY, "1")
        try:
            min_seconds = float(os.environ.get(ENV_MIN_SECONDS, "0.2"))
        except ValueError:
            min_seconds = 0.2
        return cls(reporter, kernel, bytes_per_step, int(every) if every.isdigit() else 1,
                   min_seconds)

    def step(self, step: int, waited: float = 0.0) -> None:
        self._waited += waited
        self._steps += 1
        self._step = step
        if step % self.every:
            return
        now = time.perf_counter()
        if now - self._last >= self.min_seconds:
            self._emit(now)

    def _emit(self, now: float) -> None:
        n = self._steps
        self.reporter.report(
            kind="step", kernel=self.kernel, step=self._step, steps=n,
            seconds=(now - self._last) / n, wait_seconds=self._waited / n,
            bytes=self.bytes_per_step * n,
            rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self._last, self._waited, self._steps = now, 0.0, 0

    def close(self) -> dict[str, Any]:
        if self._steps:
            self._emit(time.perf_counter())
        return self.reporter.close()


def encode_for_api(records: list[dict[str, Any]]) -> bytes:
    """The API's request body for ``records`` (what ``Reporter`` posts), for other clients."""
    return json.dumps({"records": records}, separators=(",", ":")).encode()


def telemetry_summary(per_rank: list[dict[str, Any] | None] | None) -> dict[str, Any] | None:
    """The manifest's ``telemetry`` field from every rank's counters (None when it was off)."""
    ranks = [r for r in per_rank or [] if r is not None]
    if not ranks:
        return None
    return {"transport": ranks[0]["transport"], "sent": sum(r["sent"] for r in ranks),
            "dropped": sum(r["dropped"] for r in ranks),
            "dropped_by_reason": {k: sum(r[k] for r in ranks) for k in ranks[0]
                                  if k.startswith("dropped_")},
            "last_error": next((r["last_error"] for r in ranks if r["last_error"]), None),
            "per_rank": [{"sent": r["sent"], "dropped": r["dropped"]} for r in ranks]}
