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
  (:mod:`infra.staging.checksums`); uploads hand S3 a checksum it verifies on receipt. A
  mismatch fails the transfer and the bad bytes never reach the final name.
* **Never expose partial files.** Each download is written to ``.<name>.<pid>.<rand>.cfpart``
  in the target folder, fsync'ed, and renamed into place. Leftovers of a killed run are removed
  by the next one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError, FlexibleChecksumError
from pydantic import BaseModel, Field
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from infra.aws.clients import EMBEDDED_CREDENTIALS, AwsTarget
from infra.staging.checksums import (
    CHUNK,
    Expectation,
    MultiHasher,
    expectations,
    hash_file,
    is_multipart_etag,
    part_sizes_of,
    parts_count,
    upload_part_sizes,
)
from infra.staging.locations import (
    DestinationError,
    DestinationRoot,
    LocalLocation,
    Location,
    S3Location,
    StageError,
    check_relative_key,
    destination_error,
    free_bytes,
    human_bytes,
    is_directory_marker,
    mount_point,
    parse_location,
)
from infra.staging.manifest import ManifestCache, cache_path, listing_digest
from infra.staging.objects import IntegrityError

MiB = 1 << 20
PART_SUFFIX = ".cfpart"


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


@dataclass
class Entry:
    rel: str
    size: int
    tag: str  # S3: ETag; local: mtime_ns as text
    mtime_ns: int = 0


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
    checks: dict[str, int] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` shape."""
        return {
            "src": self.src, "dst": self.dst, "files": self.files, "bytes": self.bytes_total,
            "copied": self.copied, "bytes_copied": self.bytes_copied,
            "skipped": self.skipped, "bytes_skipped": self.bytes_skipped,
            "verified_in_place": self.verified_in_place, "seconds": round(self.seconds, 3),
            "manifest_digest": self.manifest_digest, "checks": dict(sorted(self.checks.items())),
            "unverified": len(self.unverified), "unverified_examples": self.unverified[:20],
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


class _Transfer(BaseSubscriber):
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


def _client_error(e: ClientError, what: str) -> StageError:
    code = e.response.get("Error", {}).get("Code", "")
    if code in ("NoSuchBucket",):
        return StageError(f"{what}: the bucket does not exist (check the name and region)")
    if code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                "SignatureDoesNotMatch"):
        return StageError(f"{what}: access denied ({code}); the credentials in use may not "
                          "read/write this bucket or prefix")
    if code in ("NoSuchKey", "404", "NotFound"):
        return StageError(f"{what}: the object was deleted while it was being staged; re-run")
    if code in ("PreconditionFailed", "412"):
        return StageError(f"{what}: the object changed while it was being staged; re-run to "
                          "stage the new version")
    return StageError(f"{what}: {code or 'error'}: {e}")


class Stager:
    def __init__(self, aws: AwsTarget, options: StageOptions | None = None,
                 cache_dir: Path | None = None, watcher: Watcher | None = None) -> None:
        self.aws = aws
        self.options = options or StageOptions()
        self.cache_dir = cache_dir
        self.watcher = watcher
        self._s3: Any = None

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            pool = self.options.concurrency + self.options.part_concurrency + 4
            self._s3 = s3_client(self.aws, pool)
        return self._s3

    # ------------------------------------------------------------------ planning
    def list_source(self, loc: Location) -> list[Entry]:
        """The source's files, each key checked; directory markers are dropped."""
        if isinstance(loc, S3Location):
            return self._list_s3(loc, check=True)
        return _walk_local(loc.root)

    def _list_s3(self, loc: S3Location, check: bool) -> list[Entry]:
        out: list[Entry] = []
        try:
            objects = self._list_objects(loc.bucket, loc.prefix)
        except ClientError as e:
            raise _client_error(e, f"listing {loc.uri}") from e
        for obj in objects:
            rel = obj["Key"][len(loc.prefix):]
            if is_directory_marker(rel, obj["Size"]):
                continue
            if check:
                check_relative_key(rel, obj["Key"])
            out.append(Entry(rel, obj["Size"], obj.get("ETag", "")))
        if check:
            _refuse_file_dir_clashes(out, loc.uri)
        return out

    def _list_objects(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        """Every object under ``prefix``: one ListObjectsV2 pass, top-level folders in parallel.

        A listing is sequential page by page (each needs the previous continuation token);
        splitting at the first ``/`` lets the folders' pages be fetched and parsed concurrently
        at the cost of one extra request.
        """
        objects: list[dict[str, Any]] = []
        folders: list[str] = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            objects.extend(page.get("Contents", []))
            folders.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))

        def whole(folder: str) -> list[dict[str, Any]]:
            return [o for page in self.s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=folder) for o in page.get("Contents", [])]

        if len(folders) == 1:
            objects.extend(whole(folders[0]))
        elif folders:
            with ThreadPoolExecutor(min(self.options.concurrency, len(folders))) as pool:
                for chunk in pool.map(whole, folders):
                    objects.extend(chunk)
        return objects

    def digest(self, loc: Location) -> str:
        """The manifest digest of a source: what the Prefect cache key is made of."""
        return _entries_digest(self.list_source(loc))

    def current_digest(self, src: str | Location, dst: str | Location) -> tuple[str, bool]:
        """The source's manifest digest, and whether ``dst`` provably still holds exactly it.

        "Provably" means: the last complete run recorded this very digest, and every file's
        destination side still matches its record (local stat, or S3 size and ETag). This is
        the same evidence a re-stage uses to skip, gathered without moving anything.
        """
        s = parse_location(src) if isinstance(src, str) else src
        d = parse_location(dst) if isinstance(dst, str) else dst
        entries = self.list_source(s)
        digest = _entries_digest(entries)
        cache = self._cache(s, d)
        if cache is None:
            return digest, False
        records = cache.load()
        if cache.complete != digest:
            return digest, False
        if isinstance(d, LocalLocation):
            local = _scan_destination(d.root, {e.rel for e in entries})
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
        entries = self.list_source(s)
        self._refuse_empty(entries, s)
        return entries, StageReport(src=s.uri, dst=d.uri, files=len(entries),
                                    bytes_total=sum(e.size for e in entries),
                                    manifest_digest=_entries_digest(entries))

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
        local = _scan_destination(d.root, {e.rel for e in entries})
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
        report.skipped = len(skip)
        report.bytes_skipped = sum(e.size for e in skip)
        progress = Progress(files_total=len(copy) + len(verify), bytes_total=needed)
        jobs: list[tuple[Callable[..., Any], Entry]] = (
            [(self._verify_download, e) for e in verify] + [(self._download, e) for e in copy])
        ctx = _Run(self, progress, records, report, cache, downloading=True)
        ctx.execute(jobs, s=s, d=d, root=root)
        return report

    def _download(self, run: _Run, e: Entry, s: S3Location, d: LocalLocation,
                  root: DestinationRoot) -> None:
        folder = root.folder_for(e.rel)
        final = d.root / e.rel
        stem = final.name.encode()[:64].decode(errors="ignore")
        tmp = folder / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}{PART_SUFFIX}"
        key = s.key(e.rel)
        run.live_parts.add(tmp)
        try:
            try:
                if e.size <= self.options.small_object_limit and not is_multipart_etag(e.tag):
                    hasher, head = self._get_small(run, s.bucket, key, e, tmp)
                else:
                    hasher, head = self._get_managed(run, s.bucket, key, e, tmp)
            except OSError as err:
                if isinstance(err, FileNotFoundError) and not folder.exists():
                    raise DestinationError(f"{folder} vanished during staging") from err
                raise destination_error(err, final) from err
            bad = hasher.mismatches()
            if hasher.size != head["ContentLength"]:
                bad.append(f"size: expected {head['ContentLength']}, got {hasher.size}")
            if bad:
                raise IntegrityError(
                    f"{s.uri}{e.rel}: downloaded bytes do not match the object's checksum "
                    f"({'; '.join(bad)}); the file was discarded. The object may be corrupt in "
                    "S3; re-upload it")
            try:
                if final.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "Is a directory", str(final))
                os.replace(tmp, final)
            except OSError as err:
                raise destination_error(err, final) from err
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            run.live_parts.discard(tmp)
        st = final.stat()
        rec = {"size": e.size, "etag": head.get("ETag", e.tag), "local": [st.st_size,
                                                                          st.st_mtime_ns]}
        rec.update(_check_fields(hasher))
        run.done(e, rec, copied=True)

    def _get_small(self, run: _Run, bucket: str, key: str, e: Entry, tmp: Path,
                   ) -> tuple[MultiHasher, dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if e.tag:
            kwargs["IfMatch"] = e.tag
        try:
            resp = self.s3.get_object(**kwargs)
        except ClientError as err:
            raise _client_error(err, f"s3://{bucket}/{key}") from err
        hasher = MultiHasher(expectations(resp), self._extra())
        try:
            with open(tmp, "wb") as f:
                for chunk in resp["Body"].iter_chunks(CHUNK):
                    if run.abort.is_set():
                        raise StageError("aborted")
                    hasher.update(chunk)
                    f.write(chunk)
                    run.progress.add_bytes(len(chunk))
                self._sync(f)
        except FlexibleChecksumError as err:
            raise IntegrityError(
                f"s3://{bucket}/{key}: downloaded bytes do not match the object's checksum "
                f"({err}); the file was discarded. The object may be corrupt in S3") from err
        finally:
            resp["Body"].close()
        return hasher, resp

    def _head(self, bucket: str, key: str, etag: str | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "ChecksumMode": "ENABLED"}
        if etag:
            kwargs["IfMatch"] = etag
        try:
            return self.s3.head_object(**kwargs)
        except ClientError as err:
            raise _client_error(err, f"s3://{bucket}/{key}") from err

    def _checks_for(self, bucket: str, key: str, head: dict[str, Any]) -> list[Expectation]:
        checks = expectations(head)
        if not checks and is_multipart_etag(head.get("ETag")):
            sizes = part_sizes_of(self.s3, bucket, key, head["ContentLength"],
                                  parts_count(head.get("ETag")))
            if sizes:
                checks = expectations(head, part_sizes=sizes)
        return checks

    def _get_managed(self, run: _Run, bucket: str, key: str, e: Entry, tmp: Path,
                     ) -> tuple[MultiHasher, dict[str, Any]]:
        head = self._head(bucket, key, e.tag or None)
        checks = self._checks_for(bucket, key, head)
        with open(tmp, "wb") as f:
            future = run.manager.download(
                bucket, key, f, subscribers=[_Transfer(run.progress, head["ContentLength"],
                                                       head.get("ETag"))])
            run.result(future, f"s3://{bucket}/{key}")
            self._sync(f)
        return hash_file(tmp, checks, self._extra()), head

    def _verify_download(self, run: _Run, e: Entry, s: S3Location, d: LocalLocation,
                         root: DestinationRoot) -> None:
        """A same-size local file not in the cache: keep it if its checksum proves it equal."""
        head = self._head(s.bucket, s.key(e.rel), e.tag or None)
        checks = self._checks_for(s.bucket, s.key(e.rel), head)
        path = d.root / e.rel
        if checks:
            hasher = hash_file(path, checks, self._extra())
            if not hasher.mismatches() and hasher.size == head["ContentLength"]:
                st = path.stat()
                rec = {"size": e.size, "etag": head.get("ETag", e.tag),
                       "local": [st.st_size, st.st_mtime_ns], **_check_fields(hasher)}
                run.done(e, rec, copied=False, count_bytes=False)
                return
        run.progress.add_total(e.size)
        self._download(run, e, s, d, root)

    # ------------------------------------------------------------------ local -> S3
    def _upload_tree(self, s: LocalLocation, d: S3Location) -> StageReport:
        if not s.root.is_dir():
            raise StageError(f"{s.root} is not a directory (stage a folder, not a file)")
        entries, report = self._begin(s, d)
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
        report.skipped = len(skip)
        report.bytes_skipped = sum(e.size for e in skip)
        progress = Progress(files_total=len(copy) + len(verify),
                            bytes_total=sum(e.size for e in copy))
        jobs: list[tuple[Callable[..., Any], Entry]] = (
            [(self._verify_upload, e) for e in verify] + [(self._upload, e) for e in copy])
        _Run(self, progress, records, report, cache, downloading=False).execute(jobs, s=s, d=d)
        return report

    def _upload(self, run: _Run, e: Entry, s: LocalLocation, d: S3Location) -> None:
        path = s.root / e.rel
        key = d.key(e.rel)
        try:
            if e.size <= self.options.small_object_limit:
                data = path.read_bytes()
                hasher = MultiHasher([], ("sha256",))
                hasher.update(data)
                _same_file(path, e, len(data))
                try:
                    resp = self.s3.put_object(
                        Bucket=d.bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=_b64(hasher.digest("sha256")))
                except ClientError as err:
                    raise _client_error(err, f"uploading to s3://{d.bucket}/{key}") from err
                run.progress.add_bytes(len(data))
                etag = resp["ETag"]
                check = "sha256 (verified by S3 on receipt)"
            else:
                # Per-part CRC32s (S3 verifies each part on receipt) and, computed here in
                # the same pass as the SHA-256, the composite S3 will report for them. A
                # full-object CRC32 given up front would be cheaper to compare but makes
                # s3transfer upload about 2x slower (measured in bench/staging.py).
                sizes = upload_part_sizes(e.size, self.options.multipart_chunksize)
                mine = Expectation("crc32", b"", "s3-composite", sizes)
                hasher = hash_file(path, (mine,), ("sha256", "crc32"))
                _same_file(path, e, hasher.size)
                extra = {"ChecksumAlgorithm": "CRC32",
                         "Metadata": {"sha256": hasher.hexdigest("sha256")}}
                future = run.manager.upload(str(path), d.bucket, key, extra_args=extra,
                                            subscribers=[_Transfer(run.progress, e.size)])
                run.result(future, f"uploading to s3://{d.bucket}/{key}")
                head = self._head(d.bucket, key)
                # This proves what is stored now is what we hashed (and catches a concurrent
                # writer to the key): size, and the CRC32 S3 holds, composite or full.
                stored = expectations(head, part_sizes=sizes)
                crc = [c for c in stored if c.algorithm == "crc32"]
                if head["ContentLength"] != e.size or any(
                        c.digest != (hasher.composite_digest(mine) if c.part_sizes
                                     else hasher.digest("crc32")) for c in crc):
                    raise IntegrityError(
                        f"s3://{d.bucket}/{key}: the stored object does not match {path} after "
                        "upload (another writer?); re-run to upload it again")
                etag = head["ETag"]
                check = "crc32 (verified by S3 on receipt), sha256 (metadata)"
        except FileNotFoundError as err:
            raise StageError(f"{path} disappeared during staging; re-run") from err
        except OSError as err:
            raise StageError(f"cannot read {path}: {err.strerror or err}") from err
        rec = {"size": e.size, "etag": etag, "local": [e.size, e.mtime_ns],
               **_check_fields(hasher), "check": check}
        run.done(e, rec, copied=True)

    def _verify_upload(self, run: _Run, e: Entry, s: LocalLocation, d: S3Location) -> None:
        head = self._head(d.bucket, d.key(e.rel))
        checks = self._checks_for(d.bucket, d.key(e.rel), head)
        if checks:
            hasher = hash_file(s.root / e.rel, checks, self._extra())
            if not hasher.mismatches() and hasher.size == head["ContentLength"]:
                rec = {"size": e.size, "etag": head["ETag"], "local": [e.size, e.mtime_ns],
                       **_check_fields(hasher)}
                run.done(e, rec, copied=False, count_bytes=False)
                return
        run.progress.add_total(e.size)
        self._upload(run, e, s, d)

    # ------------------------------------------------------------------ helpers
    def _complete(self, rec: dict[str, Any]) -> bool:
        """A record can stand in for the file only if it holds what this run must report."""
        return not self.options.sha256 or "sha256" in rec

    def _extra(self) -> tuple[str, ...]:
        return ("sha256",) if self.options.sha256 else ()

    def _sync(self, f: Any) -> None:
        f.flush()
        if self.options.fsync:
            os.fsync(f.fileno())


class _Run:
    """One execution: the pool, the transfer manager, the journal, and abort/cleanup."""

    def __init__(self, stager: Stager, progress: Progress, records: dict[str, dict[str, Any]],
                 report: StageReport, cache: ManifestCache | None, downloading: bool) -> None:
        self.stager = stager
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
                o = self.stager.options
                config = TransferConfig(
                    multipart_threshold=o.multipart_threshold,
                    multipart_chunksize=(o.download_chunksize if self.downloading
                                         else o.multipart_chunksize),
                    max_concurrency=o.part_concurrency, use_threads=True)
                self._manager = TransferManager(self.stager.s3, config)
            return self._manager

    def result(self, future: Any, what: str) -> None:
        """Wait for one transfer; while it runs it is cancellable with the whole run."""
        with self._lock:
            self._futures.add(future)
        try:
            future.result()
        except ClientError as err:
            raise _client_error(err, what) from err
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

    def execute(self, jobs: list[tuple[Callable[..., Any], Entry]], **kwargs: Any) -> None:
        if self.cache and not jobs and self.cache.holds(self.records,
                                                        self.report.manifest_digest):
            self.cache = None  # an unchanged tree: the manifest on disk is already exact
        if self.cache:
            self.cache.open_journal(self.records)
        ok = False
        pool = ThreadPoolExecutor(max_workers=self.stager.options.concurrency,
                                  thread_name_prefix="stage")
        try:
            pending: set[Future[Any]] = {pool.submit(fn, self, e, **kwargs) for fn, e in jobs}
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                if self.stager.watcher:
                    self.stager.watcher(self.progress)
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
            if self.stager.watcher:
                self.stager.watcher(self.progress)
            if self.cache:
                self.cache.close(self.records, self.report.manifest_digest if ok else None)
        self.report.records = self.records


def _entries_digest(entries: list[Entry]) -> str:
    return listing_digest((e.rel, e.size, e.tag) for e in entries)


def _check_fields(hasher: MultiHasher) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if hasher.checks:
        out["check"] = ", ".join(sorted({c.label for c in hasher.checks}))
    if hasher.has("sha256"):
        out["sha256"] = hasher.hexdigest("sha256")
    return out


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


def _same_file(path: Path, e: Entry, size: int) -> None:
    st = path.stat()
    if st.st_size != e.size or st.st_mtime_ns != e.mtime_ns or size != e.size:
        raise StageError(f"{path} changed while it was being staged; re-run once it is stable")


def _refuse_file_dir_clashes(entries: list[Entry], uri: str) -> None:
    files = {e.rel for e in entries}
    for e in entries:
        parts = e.rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise StageError(
                    f"{uri}: {parent!r} is both a file and the folder of {e.rel!r}; a "
                    "filesystem cannot hold both, so nothing was staged")


def _walk_local(root: Path) -> list[Entry]:
    if not root.exists():
        raise StageError(f"{root} does not exist")
    if not root.is_dir():
        raise StageError(f"{root} is not a directory (stage a folder, not a file)")
    out: list[Entry] = []

    def walk(folder: Path, prefix: str) -> Iterator[Entry]:
        try:
            it = os.scandir(folder)
        except OSError as e:
            raise StageError(f"cannot read {folder}: {e.strerror or e}") from e
        with it:
            for d in it:
                rel = prefix + d.name
                if d.name.endswith(PART_SUFFIX) and d.name.startswith("."):
                    continue
                if d.is_dir(follow_symlinks=False):
                    yield from walk(Path(d.path), rel + "/")
                    continue
                try:
                    st = d.stat(follow_symlinks=True)
                except OSError:
                    continue  # a dangling symlink
                if not _is_regular(st.st_mode):
                    continue
                check_relative_key(rel, rel)
                yield Entry(rel, st.st_size, str(st.st_mtime_ns), st.st_mtime_ns)

    out.extend(walk(root, ""))
    return out


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)


def _scan_destination(root: Path, rels: set[str]) -> dict[str, Any]:
    """Stat what is already there, one scandir per source folder; clear dead runs' parts."""
    folders: dict[str, set[str]] = {}
    for rel in rels:
        parent, _, name = rel.rpartition("/")
        folders.setdefault(parent, set()).add(name)
    found: dict[str, Any] = {}
    for parent, names in folders.items():
        folder = root / parent if parent else root
        try:
            it = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise destination_error(e, folder) from e
        with it:
            for d in it:
                if d.name.endswith(PART_SUFFIX) and d.name.startswith("."):
                    _remove_dead_part(Path(d.path))
                    continue
                if d.name not in names:
                    continue
                rel = f"{parent}/{d.name}" if parent else d.name
                if d.is_dir(follow_symlinks=False):
                    found[rel] = "dir"
                    continue
                try:
                    st = d.stat(follow_symlinks=False)
                except OSError:
                    continue
                found[rel] = (st.st_size, st.st_mtime_ns)
    return found


def _remove_dead_part(path: Path) -> None:
    """A ``.name.<pid>.<rand>.cfpart`` whose writer is gone is garbage; a live one is not ours."""
    try:
        pid = int(path.name[: -len(PART_SUFFIX)].rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
            return  # still running: another stager is writing here
        except ProcessLookupError:
            pass
        except PermissionError:
            return
    with contextlib.suppress(OSError):
        path.unlink()
