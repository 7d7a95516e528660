"""What a killed upload leaves in S3, and how the next run reclaims it.

A multipart upload that is neither completed nor aborted keeps its parts (billed as storage)
and shows in ListMultipartUploads, but never becomes an object. s3transfer aborts its uploads
on every failure it sees (an exception, a cancel, Ctrl-C/SIGTERM through the stager's abort),
so what is left comes from a process that died at once (SIGKILL, OOM, a lost node). S3 cannot
tell whose upload is whose (ListMultipartUploads shows no metadata), so each run journals the
upload ids it starts in a file named for its process; the file is deleted when the run ends,
and a journal whose process is gone names exactly the uploads to abort. Aborting the id of an
upload that did complete is harmless (NoSuchUpload): the object is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from botocore.exceptions import BotoCoreError, ClientError

EVENT = "after-call.s3.CreateMultipartUpload"
# A journal for another endpoint cannot be reclaimed from here; after this long S3's own
# lifecycle rule (AbortIncompleteMultipartUpload on the buckets clusterflow creates) has.
STALE_S = 30 * 86400


def _started(pid: int) -> int:
    try:
        return int(psutil.Process(pid).create_time() * 100)
    except psutil.Error:
        return 0


class UploadJournal:
    """The multipart uploads one run starts, on disk until the run ends."""

    def __init__(self, folder: Path, endpoint: str | None) -> None:
        self.folder = folder
        self.endpoint = endpoint or ""
        pid = os.getpid()
        self.path = folder / f"{pid}-{_started(pid)}-{secrets.token_hex(3)}.jsonl"
        self._lock = threading.Lock()
        self._f: Any = None
        self._s3: Any = None
        self._uid = f"clusterflow-journal-{id(self)}"

    def attach(self, s3: Any) -> None:
        """Record every CreateMultipartUpload this client makes (s3transfer's included)."""
        self._s3 = s3
        s3.meta.events.register(EVENT, self._on_create, unique_id=self._uid)

    def _on_create(self, parsed: dict[str, Any], **kwargs: Any) -> None:
        if not parsed.get("UploadId"):
            return
        line = json.dumps({"endpoint": self.endpoint, "bucket": parsed.get("Bucket"),
                           "key": parsed.get("Key"), "upload_id": parsed["UploadId"]}) + "\n"
        with self._lock:
            if self._f is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                self._f = self.path.open("a", encoding="utf-8")
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        """The run ended in this process: every upload it started was completed or aborted."""
        if self._s3 is not None:
            self._s3.meta.events.unregister(EVENT, unique_id=self._uid)
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None
            self.path.unlink(missing_ok=True)


def _alive(name: str) -> bool:
    try:
        pid, started = (int(x) for x in name.split("-")[:2])
    except ValueError:
        return False
    return psutil.pid_exists(pid) and _started(pid) == started


def reclaim(s3: Any, folder: Path | None, endpoint: str | None) -> int:
    """Abort the uploads that runs killed before they ended left behind; how many were open."""
    if folder is None or not folder.is_dir():
        return 0
    aborted = 0
    for journal in folder.glob("*.jsonl"):
        if _alive(journal.name):
            continue  # a stager that is still running
        try:
            lines = [json.loads(x) for x in journal.read_text().splitlines() if x.strip()]
        except (OSError, ValueError):
            lines = []
        if any(x.get("endpoint") != (endpoint or "") for x in lines):
            with contextlib.suppress(OSError):
                if time.time() - journal.stat().st_mtime > STALE_S:
                    journal.unlink()
            continue
        for x in lines:
            try:
                s3.abort_multipart_upload(Bucket=x["bucket"], Key=x["key"],
                                          UploadId=x["upload_id"])
                aborted += 1
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("NoSuchUpload", "404"):
                    return aborted  # cannot reach it now; the journal stays for the next run
            except BotoCoreError:
                return aborted
        with contextlib.suppress(OSError):
            journal.unlink()
    return aborted


def incomplete_uploads(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Keys under ``prefix`` with an upload still open (another tool's, or a running stage's)."""
    out: list[str] = []
    with contextlib.suppress(ClientError, BotoCoreError):
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                        Prefix=prefix):
            out.extend(u["Key"] for u in page.get("Uploads", []))
    return out
