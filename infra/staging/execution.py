"""One execution of a planned transfer: the thread pool, s3transfer's manager, the journal, abort.

The planner (:mod:`infra.staging.stager`) decides what to move; the per-file code
(:mod:`infra.staging.download`, :mod:`infra.staging.upload`) moves one file. What they share
lives here: the S3 client sized for the pool, progress forwarding, recording each finished file
in the manifest journal, and stopping everything (and removing partial files) on the first
failure.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from infra.aws.clients import EMBEDDED_CREDENTIALS, AwsTarget
from infra.staging.locations import client_error
from infra.staging.manifest import ManifestCache
from infra.staging.model import Entry, Progress, StageOptions, StageReport, Watcher


def s3_client(aws: AwsTarget, pool: int) -> Any:
    """An S3 client like ``aws.client('s3')`` but with a connection pool sized for the stager.

    The shared client's pool (10) would serialise a concurrent transfer; S3 reads and writes are
    idempotent, so they are retried even against the embedded endpoint.
    """
    session = boto3.session.Session(region_name=aws.region)
    # Listings are parsed on this host; botocore's timestamp parsing was a third of the cost of
    # a 10,000-key listing, and the stager never reads a timestamp.
    session._session.get_component("response_parser_factory").set_parser_defaults(  # noqa: SLF001
        timestamp_parser=str)
    kwargs: dict[str, Any] = {}
    if aws.endpoint_url:
        kwargs["endpoint_url"] = aws.endpoint_url
        if aws.embedded or session.get_credentials() is None:
            kwargs.update(EMBEDDED_CREDENTIALS)
    config = Config(region_name=aws.region, max_pool_connections=pool,
                    retries={"mode": "standard", "total_max_attempts": 3 if aws.embedded else 6},
                    connect_timeout=10, read_timeout=120, tcp_keepalive=True)
    return session.client("s3", config=config, **kwargs)


class TransferProgress(BaseSubscriber):
    """Hands s3transfer what we already know (no extra HEAD) and forwards its progress."""

    def __init__(self, progress: Progress, size: int | None = None, etag: str | None = None,
                 ) -> None:
        self._progress, self._size, self._etag = progress, size, etag

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        if self._size is not None:
            future.meta.provide_transfer_size(self._size)
        if self._etag is not None:
            future.meta.provide_object_etag(self._etag)

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._progress.add_bytes(bytes_transferred)


Job = Callable[..., Any]


class Run:
    """One execution: the pool, the transfer manager, the journal, and abort/cleanup."""

    def __init__(self, s3: Any, options: StageOptions, watcher: Watcher | None,
                 progress: Progress, records: dict[str, dict[str, Any]], report: StageReport,
                 cache: ManifestCache | None, downloading: bool) -> None:
        self.s3 = s3
        self.options = options
        self.watcher = watcher
        self.downloading = downloading
        self.progress = progress
        self.records = records
        self.report = report
        self.cache = cache
        self.abort = threading.Event()
        self.live_parts: set[Path] = set()
        self._futures: set[Any] = set()
        self._lock = threading.Lock()
        self._manager: TransferManager | None = None

    @property
    def manager(self) -> TransferManager:
        with self._lock:
            if self._manager is None:
                o = self.options
                config = TransferConfig(
                    multipart_threshold=o.multipart_threshold,
                    multipart_chunksize=(o.download_chunksize if self.downloading
                                         else o.multipart_chunksize),
                    max_concurrency=o.part_concurrency, use_threads=True)
                self._manager = TransferManager(self.s3, config)
            return self._manager

    def extra(self) -> tuple[str, ...]:
        """Hashes to compute beyond what verification needs (``--sha256`` records them)."""
        return ("sha256",) if self.options.sha256 else ()

    def sync(self, f: Any) -> None:
        f.flush()
        if self.options.fsync:
            os.fsync(f.fileno())

    def result(self, future: Any, what: str) -> None:
        """Wait for one transfer; while it runs it is cancellable with the whole run."""
        with self._lock:
            self._futures.add(future)
        try:
            future.result()
        except ClientError as err:
            raise client_error(err, what) from err
        finally:
            with self._lock:
                self._futures.discard(future)

    def done(self, e: Entry, rec: dict[str, Any], copied: bool, count_bytes: bool = True,
             ) -> None:
        with self._lock:
            self.records[e.rel] = rec
            if copied:
                self.report.copied += 1
                self.report.bytes_copied += e.size
            else:
                self.report.skipped += 1
                self.report.bytes_skipped += e.size
                self.report.verified_in_place += 1
            check = rec.get("check", "size only")
            self.report.checks[check] = self.report.checks.get(check, 0) + 1
            if check == "size only":
                self.report.unverified.append(e.rel)
        if self.cache:
            self.cache.record(e.rel, rec)
        self.progress.file_done()

    def execute(self, jobs: list[tuple[Job, Entry]], **kwargs: Any) -> None:
        if self.cache and not jobs and self.cache.holds(self.records,
                                                        self.report.manifest_digest):
            self.cache = None  # an unchanged tree: the manifest on disk is already exact
        if self.cache:
            self.cache.open_journal(self.records)
        ok = False
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency,
                                  thread_name_prefix="stage")
        try:
            pending: set[Future[Any]] = {pool.submit(fn, self, e, **kwargs) for fn, e in jobs}
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                if self.watcher:
                    self.watcher(self.progress)
                for f in done:
                    f.result()  # the first failure aborts the rest
            ok = True
        finally:
            if not ok:
                self.abort.set()
                for f in list(self._futures):
                    with contextlib.suppress(Exception):
                        f.cancel()
            pool.shutdown(wait=True, cancel_futures=not ok)
            if self._manager is not None:
                self._manager.shutdown(cancel=not ok)
            for part in list(self.live_parts):
                with contextlib.suppress(OSError):
                    part.unlink()
            if self.watcher:
                self.watcher(self.progress)
            if self.cache:
                self.cache.close(self.records, self.report.manifest_digest if ok else None)
        self.report.records = self.records
