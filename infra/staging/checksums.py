"""What an S3 object's bytes should hash to, and whether a local file does.

S3 records integrity in several ways, depending on who wrote the object and how: a full-object
additional checksum (SHA-256, SHA-1, CRC32, ...), a *composite* one for multipart uploads (the
checksum of the concatenated part checksums, ``...-N``), clusterflow's own ``sha256`` user
metadata, and the ETag (the MD5 of the bytes for a plain PUT, the MD5 of the part MD5s for a
multipart upload; neither holds under SSE-KMS/SSE-C). :func:`expectations` turns an object's
headers into every check that can be computed here, and :class:`MultiHasher` computes them all
in one pass over the data, so a download is read back at most once.

moto quirk worth knowing: it reports a composite checksum without the ``-N`` suffix and without
``ChecksumType``. A checksum is therefore taken as full-object only when S3 says so
(``ChecksumType: FULL_OBJECT``) or when nothing suggests a multipart upload (no ``-`` in the
value or the ETag).
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

CHUNK = 1 << 20


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self._v = 0

    def update(self, data: bytes, /) -> None:
        self._v = zlib.crc32(data, self._v)

    def digest(self) -> bytes:
        return self._v.to_bytes(4, "big")


class _CrtCrc:
    def __init__(self, fn: Any, width: int) -> None:
        self._fn, self._width, self._v = fn, width, 0

    def update(self, data: bytes, /) -> None:
        self._v = self._fn(data, self._v)

    def digest(self) -> bytes:
        return self._v.to_bytes(self._width, "big")


def _crt_factories() -> dict[str, Any]:
    try:  # optional: awscrt (boto3[crt]) brings CRC32C and CRC64NVME
        from awscrt import checksums
    except ImportError:
        return {}
    out: dict[str, Any] = {"crc32c": lambda: _CrtCrc(checksums.crc32c, 4)}
    if hasattr(checksums, "crc64nvme"):
        out["crc64nvme"] = lambda: _CrtCrc(checksums.crc64nvme, 8)
    return out


_FACTORIES: dict[str, Any] = {
    "crc32": _Crc32,
    "sha256": hashlib.sha256,
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
    **_crt_factories(),
}
# Cheapest first: when several full-object checks exist, all are verified, but a caller that
# wants only one (``first_only``) gets the fastest.
_S3_ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


def supported(algorithm: str) -> bool:
    return algorithm in _FACTORIES


def new_hash(algorithm: str) -> _Hash:
    return _FACTORIES[algorithm]()


@dataclass(frozen=True)
class Expectation:
    """One check a local copy must pass. ``part_sizes`` set means a composite check."""

    algorithm: str
    digest: bytes
    source: str  # "s3-checksum", "s3-composite", "metadata", "etag", "etag-multipart"
    part_sizes: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        kind = "composite " if self.part_sizes else ""
        return f"{kind}{self.algorithm} ({self.source})"

    @property
    def b64(self) -> str:
        return base64.b64encode(self.digest).decode()


def b64_to_bytes(value: str) -> bytes:
    return base64.b64decode(value.split("-", 1)[0])


def etag_hex(etag: str | None) -> str:
    return (etag or "").strip('"')


def is_multipart_etag(etag: str | None) -> bool:
    return "-" in etag_hex(etag)


def expectations(head: dict[str, Any], *, part_sizes: tuple[int, ...] | None = None,
                 ) -> list[Expectation]:
    """Every check computable here for an object, from its HEAD/GET response.

    Composite checks need the part sizes; pass them (see :func:`part_sizes_of`) when the object
    is a multipart upload, otherwise those checks are left out.
    """
    out: list[Expectation] = []
    etag = head.get("ETag")
    multipart = is_multipart_etag(etag)
    ctype = head.get("ChecksumType")
    for algo in _S3_ALGORITHMS:
        value = head.get(f"Checksum{algo.upper()}")
        if not value or not supported(algo):
            continue
        full = ctype == "FULL_OBJECT" or (ctype is None and "-" not in value and not multipart)
        if full:
            out.append(Expectation(algo, b64_to_bytes(value), "s3-checksum"))
        elif part_sizes:
            out.append(Expectation(algo, b64_to_bytes(value), "s3-composite", part_sizes))
    meta = (head.get("Metadata") or {}).get("sha256")
    if meta:
        try:
            out.append(Expectation("sha256", bytes.fromhex(meta), "metadata"))
        except ValueError:
            out.append(Expectation("sha256", b"", "metadata"))  # malformed: cannot match
    encrypted = head.get("ServerSideEncryption") in ("aws:kms", "aws:kms:dsse") or bool(
        head.get("SSECustomerAlgorithm"))
    if not out and etag and not encrypted:
        # The ETag is the weakest check (MD5, and slow): used only when nothing else exists.
        if not multipart:
            out.append(Expectation("md5", bytes.fromhex(etag_hex(etag)), "etag"))
        elif part_sizes:
            out.append(Expectation("md5", bytes.fromhex(etag_hex(etag).split("-")[0]),
                                   "etag-multipart", part_sizes))
    return out


def needs_part_sizes(head: dict[str, Any]) -> bool:
    """True when the only usable checks would be composite ones."""
    return is_multipart_etag(head.get("ETag")) and not expectations(head)


def part_sizes_of(s3: Any, bucket: str, key: str, size: int, parts: int | None,
                  ) -> tuple[int, ...] | None:
    """The sizes of a multipart object's parts (uniform parts assumed, as every SDK uploads)."""
    if not parts:
        return None
    first = s3.head_object(Bucket=bucket, Key=key, PartNumber=1)["ContentLength"]
    if first <= 0:
        return None
    sizes = [first] * (parts - 1)
    last = size - first * (parts - 1)
    if last <= 0 or last > first:
        return None
    return (*sizes, last)


def upload_part_sizes(size: int, chunksize: int) -> tuple[int, ...]:
    """The part sizes s3transfer will use to upload ``size`` bytes with ``chunksize`` (it
    grows the chunk size to stay within S3's 10,000 parts)."""
    from s3transfer.utils import ChunksizeAdjuster

    part = ChunksizeAdjuster().adjust_chunksize(chunksize, size)
    full, last = divmod(size, part)
    return (part,) * full + ((last,) if last else ())


def parts_count(etag: str | None) -> int | None:
    hexpart = etag_hex(etag)
    if "-" not in hexpart:
        return None
    try:
        return int(hexpart.rsplit("-", 1)[1])
    except ValueError:
        return None


class MultiHasher:
    """Feeds one stream of bytes to every expectation (full and composite) at once."""

    def __init__(self, checks: Iterable[Expectation], extra: Iterable[str] = ()) -> None:
        self.checks = list(checks)
        algos = {c.algorithm for c in self.checks if not c.part_sizes} | set(extra)
        self._full = {a: new_hash(a) for a in algos}
        self._composite = [_Composite(c) for c in self.checks if c.part_sizes]
        self.size = 0

    def update(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        for h in self._full.values():
            h.update(data)
        for c in self._composite:
            c.update(data)

    def has(self, algorithm: str) -> bool:
        return algorithm in self._full

    def digest(self, algorithm: str) -> bytes:
        return self._full[algorithm].digest()

    def hexdigest(self, algorithm: str) -> str:
        return self.digest(algorithm).hex()

    def composite_digest(self, check: Expectation) -> bytes:
        """The composite digest computed for ``check`` (one with part sizes)."""
        return next(x for x in self._composite if x.check is check).digest()

    def mismatches(self) -> list[str]:
        """Human-readable list of failed checks; empty when every check passed."""
        bad = []
        for c in self.checks:
            if c.part_sizes:
                got = self.composite_digest(c)
            else:
                got = self._full[c.algorithm].digest()
            if got != c.digest:
                bad.append(f"{c.label}: expected {c.digest.hex() or '(malformed)'}, "
                           f"got {got.hex()}")
        return bad


class _Composite:
    """Checksum of the concatenated per-part checksums (S3's multipart rule)."""

    def __init__(self, check: Expectation) -> None:
        assert check.part_sizes
        self.check = check
        self._sizes = list(check.part_sizes)
        self._index, self._left = 0, self._sizes[0]
        self._part = new_hash(check.algorithm)
        self._digests: list[bytes] = []

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left == 0:
                self._close_part()
            take = view[: self._left] if self._left > 0 else view
            self._part.update(bytes(take))
            self._left -= len(take)
            view = view[len(take):]

    def _close_part(self) -> None:
        self._digests.append(self._part.digest())
        self._index += 1
        self._part = new_hash(self.check.algorithm)
        self._left = self._sizes[self._index] if self._index < len(self._sizes) else -1

    def digest(self) -> bytes:
        digests = [*self._digests, self._part.digest()]
        h = new_hash(self.check.algorithm)
        h.update(b"".join(digests))
        return h.digest()


def hash_file(path: Path, checks: Iterable[Expectation] = (), extra: Iterable[str] = (),
              ) -> MultiHasher:
    hasher = MultiHasher(checks, extra)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher
