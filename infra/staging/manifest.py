"""The stager's memory of what it already moved, so an unchanged tree is not moved again.

One file per (endpoint, source, destination) under the state dir. It is a journal: a record is
appended (and flushed) as each file lands, so a run that is killed leaves behind exactly the
files it finished, and the next run skips them without a request per object. At the end of a
successful run the journal is rewritten compactly with the digest of the source listing it
reflects (``complete``), which the Prefect cache key uses to prove a destination is intact.

Records are keyed by the path relative to the prefix/root. A download record holds the
object's size and ETag and the local file's size and mtime; an upload record the local stat and
the ETag S3 gave the object. A skip needs both sides to match, so a change on either side, or a
deleted local file, makes the file move again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

VERSION = 1


def cache_path(cache_dir: Path, endpoint: str | None, src: str, dst: str) -> Path:
    ident = json.dumps([endpoint or "aws", src, dst])
    return cache_dir / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.jsonl"


def listing_digest(entries: Iterable[tuple[str, int, str]]) -> str:
    """Digest of a source listing: sorted (relative key, size, ETag or local mtime)."""
    h = hashlib.sha256()
    for rel, size, tag in sorted(entries):
        h.update(json.dumps([rel, size, tag]).encode())
        h.update(b"\n")
    return h.hexdigest()


class ManifestCache:
    def __init__(self, path: Path, src: str, dst: str) -> None:
        self.path = path
        self.src, self.dst = src, dst
        self.complete: str | None = None
        self.loaded = 0
        self._lock = threading.Lock()
        self._journal: Any = None

    def load(self) -> dict[str, dict[str, Any]]:
        """Records from an earlier run (empty if none, or if the file belongs to another pair)."""
        records: dict[str, dict[str, Any]] = {}
        try:
            lines = self.path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return records
        if not lines:
            return records
        try:
            head = json.loads(lines[0])
        except ValueError:
            return records
        if head.get("v") != VERSION or head.get("src") != self.src or head.get("dst") != self.dst:
            return records
        self.complete = head.get("complete")
        self.loaded = 0
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line after a kill
            if rec.get("complete"):
                self.complete = rec["complete"]
                continue
            key = rec.pop("k", None)
            if isinstance(key, str):
                records[key] = rec
        self.loaded = len(records)
        return records

    def holds(self, records: Mapping[str, dict[str, Any]], digest: str) -> bool:
        """True when the file already says exactly this (nothing to write for a no-op run)."""
        return self.complete == digest and self.loaded == len(records)

    def open_journal(self, records: Mapping[str, dict[str, Any]]) -> None:
        """Start appending; the file is first rewritten with the records still valid."""
        self.complete = None
        self._write(records, complete=None)
        self._journal = self.path.open("a", encoding="utf-8")

    def record(self, rel: str, rec: dict[str, Any]) -> None:
        line = json.dumps({"k": rel, **rec}, ensure_ascii=False) + "\n"
        with self._lock:
            if self._journal is not None:
                self._journal.write(line)
                self._journal.flush()

    def close(self, records: Mapping[str, dict[str, Any]], complete: str | None) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
        if complete is not None:
            self._write(records, complete)
            self.complete = complete

    def _write(self, records: Mapping[str, dict[str, Any]], complete: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for old in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            _remove_if_dead(old)  # a rewrite a killed run left half-written
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        head = {"v": VERSION, "src": self.src, "dst": self.dst, "complete": complete}
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps(head) + "\n")
            for rel, rec in records.items():
                f.write(json.dumps({"k": rel, **rec}, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)


def _remove_if_dead(tmp: Path) -> None:
    """Remove ``.<name>.<pid>.tmp`` unless process ``pid`` still runs (it may be writing it)."""
    try:
        pid = int(tmp.name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
            return
        except ProcessLookupError:
            pass
        except PermissionError:
            return
    tmp.unlink(missing_ok=True)
