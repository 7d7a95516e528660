"""Fast, safe, resumable staging between S3 and a local (or cluster-mounted) directory.

One ``Stager.stage(src, dst)`` call moves a whole prefix/tree, either direction:

* **Plan before moving anything.** The source is listed once (ListObjectsV2 pages, or one walk
  of the local tree) and every key is checked, so an unsafe key refuses the whole transfer and
  nothing is written. The destination side is listed/stat'ed once and compared with the
  manifest cache (:mod:`infra.staging.manifest`): a file whose both sides match what the cache
  says was moved before is skipped with no request at all. A file that exists on both sides
  with the same size but is not in the cache (a run was killed between rename and journal, or
  the tree came from another tool) is proved identical by checksum instead of being moved.
* **Move concurrently.** Small objects go as one GET/PUT each on a thread pool (one request,
  hashed while streamed); large or multipart ones go through s3transfer's TransferManager
  (ranged GETs, multipart uploads with per-part checksums and a full-object CRC32 S3 verifies).
* **Verify everything.** Downloads are checked against every checksum the object carries
  (:mod:`infra.staging.checksums`); uploads hand S3 a checksum it verifies on receipt and
  send exactly the bytes they hashed (a file rewritten mid-upload fails before its object
  exists). A mismatch fails the transfer and the bad bytes never reach the final name.
* **Never expose partial files.** Each download is written to ``.<name>.<pid>.<rand>.cfpart``
  in the target folder, fsync'ed, and renamed into place. Leftovers of a killed run are removed
  by the next one: its ``.cfpart`` files, and its multipart uploads (:mod:`infra.staging.reclaim`).

This module plans (what to skip, prove in place, or move); the rest lives next to it:
:mod:`~infra.staging.listing` (listing both sides), :mod:`~infra.staging.execution` (the pool,
journal and abort), :mod:`~infra.staging.download` and :mod:`~infra.staging.upload` (one file
each way), :mod:`~infra.staging.verify` (what a file is checked against), and
:mod:`~infra.staging.model` (options, entries, the report), :mod:`~infra.staging.reclaim` (what
a killed upload leaves in S3).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from infra.aws.clients import AwsTarget
from infra.staging.download import download_file, verify_download
from infra.staging.execution import Job, Run, s3_client
from infra.staging.listing import s3_entries, scan_destination, walk_local
from infra.staging.locations import (
    DestinationError,
    DestinationRoot,
    LocalLocation,
    Location,
    S3Location,
    StageError,
    free_bytes,
    human_bytes,
    mount_point,
    parse_location,
)
from infra.staging.manifest import ManifestCache, cache_path
from infra.staging.model import (
    Entry,
    Progress,
    StageOptions,
    StageReport,
    Watcher,
    entries_digest,
)
from infra.staging.reclaim import UploadJournal, incomplete_uploads, reclaim
from infra.staging.upload import upload_file, verify_upload


class Stager:
    def __init__(self, aws: AwsTarget, options: StageOptions | None = None,
                 cache_dir: Path | None = None, watcher: Watcher | None = None,
                 journal_dir: Path | None = None) -> None:
        self.aws = aws
        self.options = options or StageOptions()
        self.cache_dir = cache_dir
        self.watcher = watcher
        # Where uploads journal their multipart upload ids (see infra.staging.reclaim).
        self.journal_dir = journal_dir or (cache_dir / "uploads" if cache_dir else None)
        self._s3: Any = None

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            pool = self.options.concurrency + self.options.part_concurrency + 4
            self._s3 = s3_client(self.aws, pool)
        return self._s3

    # ------------------------------------------------------------------ planning
    def list_source(self, loc: Location, skipped: list[dict[str, str]] | None = None,
                    ) -> list[Entry]:
        """The source's files, each key checked; directory markers are dropped.

        Local entries that are not staged (see :func:`~infra.staging.listing.walk_local`) are
        appended to ``skipped`` with their reason.
        """
        if isinstance(loc, S3Location):
            return self._list_s3(loc, check=True)
        return walk_local(loc.root, self.options.follow_links, skipped)

    def _list_s3(self, loc: S3Location, check: bool) -> list[Entry]:
        return s3_entries(self.s3, loc, check, self.options.concurrency)

    def digest(self, loc: Location) -> str:
        """The manifest digest of a source: what the Prefect cache key is made of."""
        return entries_digest(self.list_source(loc))

    def current_digest(self, src: str | Location, dst: str | Location) -> tuple[str, bool]:
        """The source's manifest digest, and whether ``dst`` provably still holds exactly it.

        "Provably" means: the last complete run recorded this very digest, and every file's
        destination side still matches its record (local stat, or S3 size and ETag). This is
        the same evidence a re-stage uses to skip, gathered without moving anything.
        """
        s = parse_location(src) if isinstance(src, str) else src
        d = parse_location(dst) if isinstance(dst, str) else dst
        entries = self.list_source(s)
        digest = entries_digest(entries)
        cache = self._cache(s, d)
        if cache is None:
            return digest, False
        records = cache.load()
        if cache.complete != digest:
            return digest, False
        if isinstance(d, LocalLocation):
            local = scan_destination(d.root, {e.rel for e in entries})
            for e in entries:
                st, rec = local.get(e.rel), records.get(e.rel)
                if not rec or not isinstance(st, tuple) or rec.get("local") != [st[0], st[1]]:
                    return digest, False
        else:
            remote = {e.rel: e for e in self._list_s3(d, check=False)}
            for e in entries:
                r, rec = remote.get(e.rel), records.get(e.rel)
                if not rec or r is None or rec.get("etag") != r.tag or rec.get("size") != r.size:
                    return digest, False
        return digest, True

    # ------------------------------------------------------------------ entry point
    def stage(self, src: str | Location, dst: str | Location) -> StageReport:
        t0 = time.perf_counter()
        s = parse_location(src) if isinstance(src, str) else src
        d = parse_location(dst) if isinstance(dst, str) else dst
        if isinstance(s, S3Location) and isinstance(d, LocalLocation):
            report = self._download_tree(s, d)
        elif isinstance(s, LocalLocation) and isinstance(d, S3Location):
            report = self._upload_tree(s, d)
        else:
            raise StageError(
                f"staging {s.uri} to {d.uri} is not supported: one side must be s3://bucket/"
                "prefix and the other a local directory"
            )
        report.seconds = time.perf_counter() - t0
        return report

    def _cache(self, s: Location, d: Location) -> ManifestCache | None:
        if self.cache_dir is None:
            return None
        path = cache_path(self.cache_dir, self.aws.endpoint_url, s.uri, d.uri)
        return ManifestCache(path, s.uri, d.uri)

    def _begin(self, s: Location, d: Location) -> tuple[list[Entry], StageReport]:
        """The source's entries (refused if empty) and a report that counts them."""
        left_out: list[dict[str, str]] = []
        entries = self.list_source(s, left_out)
        self._refuse_empty(entries, s)
        return entries, StageReport(src=s.uri, dst=d.uri, files=len(entries),
                                    bytes_total=sum(e.size for e in entries),
                                    manifest_digest=entries_digest(entries),
                                    skipped=len(left_out), skipped_entries=left_out)

    def _refuse_empty(self, entries: list[Entry], s: Location) -> None:
        if not entries and not self.options.allow_empty:
            raise StageError(
                f"{s.uri} holds no files; check the bucket/prefix or path "
                "(pass --allow-empty if an empty source is expected)"
            )

    # ------------------------------------------------------------------ S3 -> local
    def _download_tree(self, s: S3Location, d: LocalLocation) -> StageReport:
        entries, report = self._begin(s, d)
        root = DestinationRoot(d.root)
        root.prepare()
        cache = self._cache(s, d)
        old = cache.load() if cache else {}
        removed: list[Path] = []
        local = scan_destination(d.root, {e.rel for e in entries}, removed)
        report.reclaimed_parts = len(removed)
        skip, verify, copy = [], [], []
        for e in entries:
            st = local.get(e.rel)
            rec = old.get(e.rel)
            if st is None:
                copy.append(e)
            elif st == "dir":
                raise DestinationError(
                    f"{d.root / e.rel} is a directory, but the source has a file "
                    f"{s.key(e.rel)!r} there; move it aside")
            elif (rec and rec.get("etag") == e.tag and rec.get("size") == e.size
                  and rec.get("local") == [st[0], st[1]] and self._complete(rec)):
                skip.append(e)
            elif st[0] == e.size:
                verify.append(e)
            else:
                copy.append(e)
        needed = sum(e.size for e in copy)
        if self.options.check_space and needed:
            free = free_bytes(d.root)
            if needed > free:
                raise DestinationError(
                    f"not enough space on {mount_point(d.root)}: {len(copy)} files need "
                    f"{human_bytes(needed)}, {human_bytes(free)} is free; nothing was staged. "
                    "Free some space or stage to another filesystem")
        records = {e.rel: old[e.rel] for e in skip}
        report.skipped += len(skip)
        report.bytes_skipped = sum(e.size for e in skip)
        progress = Progress(files_total=len(copy) + len(verify), bytes_total=needed)
        jobs: list[tuple[Job, Entry]] = (
            [(verify_download, e) for e in verify] + [(download_file, e) for e in copy])
        ctx = self._run(progress, records, report, cache, downloading=True)
        ctx.execute(jobs, s=s, d=d, root=root)
        return report

    # ------------------------------------------------------------------ local -> S3
    def _upload_tree(self, s: LocalLocation, d: S3Location) -> StageReport:
        if not s.root.is_dir():
            raise StageError(f"{s.root} is not a directory (stage a folder, not a file)")
        entries, report = self._begin(s, d)
        report.reclaimed_uploads = reclaim(self.s3, self.journal_dir, self.aws.endpoint_url)
        remote = {e.rel: e for e in self._list_s3(d, check=False)}
        cache = self._cache(s, d)
        old = cache.load() if cache else {}
        skip, verify, copy = [], [], []
        for e in entries:
            r, rec = remote.get(e.rel), old.get(e.rel)
            if r is None:
                copy.append(e)
            elif (rec and rec.get("local") == [e.size, e.mtime_ns] and rec.get("etag") == r.tag
                  and r.size == e.size and self._complete(rec)):
                skip.append(e)
            elif r.size == e.size:
                verify.append(e)
            else:
                copy.append(e)
        records = {e.rel: old[e.rel] for e in skip}
        report.skipped += len(skip)
        report.bytes_skipped = sum(e.size for e in skip)
        progress = Progress(files_total=len(copy) + len(verify),
                            bytes_total=sum(e.size for e in copy))
        jobs: list[tuple[Job, Entry]] = (
            [(verify_upload, e) for e in verify] + [(upload_file, e) for e in copy])
        ctx = self._run(progress, records, report, cache, downloading=False)
        journal = UploadJournal(self.journal_dir, self.aws.endpoint_url) if (
            self.journal_dir and jobs) else None
        if journal:
            journal.attach(self.s3)
        try:
            ctx.execute(jobs, s=s, d=d)
        finally:
            # The run's own uploads are all completed or aborted by now (s3transfer aborts on
            # failure and on cancel); only a killed process leaves its journal behind.
            if journal:
                journal.close()
        report.incomplete_uploads = incomplete_uploads(self.s3, d.bucket, d.prefix)
        return report

    # ------------------------------------------------------------------ helpers
    def _complete(self, rec: dict[str, Any]) -> bool:
        """A record can stand in for the file only if it holds what this run must report."""
        return not self.options.sha256 or "sha256" in rec

    def _run(self, progress: Progress, records: dict[str, dict[str, Any]], report: StageReport,
             cache: ManifestCache | None, downloading: bool) -> Run:
        return Run(self.s3, self.options, self.watcher, progress, records, report, cache,
                   downloading)
