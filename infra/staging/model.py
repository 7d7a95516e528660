"""The stager's vocabulary: its options, a listed file, the report and the progress counters.

Kept apart from the code that lists, moves and verifies so each of those modules (and the CLI,
which only needs the options and the progress counters) can import it without importing the
others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from infra.staging.manifest import listing_digest

MiB = 1 << 20


class StageOptions(BaseModel):
    """Knobs of one staging run; the defaults suit both moto on a laptop and S3 from EC2."""

    concurrency: int = Field(16, ge=1, le=256, description="files in flight at once")
    small_object_limit: int = Field(8 * MiB, ge=0,
                                    description="objects up to this size go as one request")
    multipart_threshold: int = Field(64 * MiB, ge=5 * MiB)
    multipart_chunksize: int = Field(16 * MiB, ge=5 * MiB, description="upload part size")
    # Ranged GETs are cheap per request on S3 but each one costs a whole-object read on some
    # S3-compatible servers (moto among them); fewer, larger ranges serve both well.
    download_chunksize: int = Field(64 * MiB, ge=5 * MiB, description="download range size")
    part_concurrency: int = Field(8, ge=1, le=64, description="parts in flight for big files")
    allow_empty: bool = Field(False, description="an empty source is not an error")
    check_space: bool = Field(True, description="refuse up front when the bytes cannot fit")
    fsync: bool = Field(True, description="fsync each file before it gets its final name")
    sha256: bool = Field(False, description="record every file's SHA-256 even when not needed")
    follow_links: bool = Field(False, description="follow symlinks that leave a local source "
                               "tree, and links to directories (else refused / left out)")


@dataclass
class Entry:
    rel: str
    size: int
    tag: str  # S3: ETag; local: mtime_ns as text
    mtime_ns: int = 0


def entries_digest(entries: list[Entry]) -> str:
    return listing_digest((e.rel, e.size, e.tag) for e in entries)


@dataclass
class StageReport:
    src: str
    dst: str
    files: int = 0
    bytes_total: int = 0
    copied: int = 0
    bytes_copied: int = 0
    skipped: int = 0
    bytes_skipped: int = 0
    verified_in_place: int = 0
    seconds: float = 0.0
    manifest_digest: str = ""
    unverified: list[str] = field(default_factory=list)
    # Source entries that were not staged and why (links to directories, dangling links,
    # special files); they count in ``skipped`` next to the unchanged files.
    skipped_entries: list[dict[str, str]] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)
    # Leftovers of killed runs this run removed: part files in the destination (downloads)
    # and multipart uploads a journal named (uploads); and open uploads still under the
    # destination prefix that no journal of ours names (another tool's, or a running stage's).
    reclaimed_parts: int = 0
    reclaimed_uploads: int = 0
    incomplete_uploads: list[str] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def unchanged(self) -> int:
        """Files left alone because the destination already held them."""
        return self.skipped - len(self.skipped_entries)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` shape."""
        return {
            "src": self.src, "dst": self.dst, "files": self.files, "bytes": self.bytes_total,
            "copied": self.copied, "bytes_copied": self.bytes_copied,
            "skipped": self.skipped, "bytes_skipped": self.bytes_skipped,
            "verified_in_place": self.verified_in_place, "seconds": round(self.seconds, 3),
            "manifest_digest": self.manifest_digest, "checks": dict(sorted(self.checks.items())),
            "unverified": len(self.unverified), "unverified_examples": self.unverified[:20],
            "skipped_entries": list(self.skipped_entries),
            "reclaimed": {"part_files": self.reclaimed_parts,
                          "multipart_uploads": self.reclaimed_uploads},
            "incomplete_uploads": len(self.incomplete_uploads),
        }


@dataclass
class Progress:
    """Counters a UI polls; updated from worker threads."""

    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes_done += n

    def add_total(self, n: int) -> None:
        with self.lock:
            self.bytes_total += n

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1


Watcher = Callable[[Progress], None]
