"""FASTA/FASTQ input for the k-mer kernel: format detection and record-aligned chunks.

The input is cut into fixed-size byte chunks, ``chunk j = [j*C, (j+1)*C)``, and each chunk is
moved to record boundaries: chunk j holds exactly the records whose first byte lies in
``[j*C, (j+1)*C)``. Both ends of a chunk are found by the same rule (`_record_start`), so
neighbouring chunks agree on their shared boundary and every record belongs to exactly one
chunk, however the chunks are spread over ranks. Rank r reads chunks r, r+N, r+2N, ...

Record starts:
    FASTA: a line beginning with ``>``.
    FASTQ: a line beginning with ``@`` whose next-but-one line begins with ``+``. A quality
        line may also begin with ``@``, but the line two below a quality line is the next
        record's sequence, which never begins with ``+``: the rule is unambiguous for 4-line
        FASTQ (multi-line FASTQ is not supported). At the end of the file an ``@`` line without
        two lines after it is not a start; if it was a truncated record, the parser of the
        preceding record reports it.

Plain files are read with ``pread`` at any offset. gzip has no random access, so for ``.gz``
input every rank decompresses the stream from the start and keeps only its own chunks
(`GzipSource` is forward-only and holds one chunk at a time). Decompression (~300+ MB/s) is
cheap next to counting, so this costs far less than staging a decompressed copy through one
rank, needs no scratch space, and works for multi-member (bgzip) files too.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Protocol

FASTA, FASTQ = 0, 1
FORMAT_NAMES = {FASTA: "FASTA", FASTQ: "FASTQ"}
_GZIP_MAGIC = b"\x1f\x8b"


class InputError(ValueError):
    """The input is unusable; the message names the file and the problem."""


class ByteSource(Protocol):
    def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset`; fewer only at the end of the data."""
        ...

    def close(self) -> None: ...


class PlainSource:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def read_at(self, offset: int, size: int) -> bytes:
        parts = []
        while size > 0:
            data = os.pread(self._fd, size, offset)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            size -= len(data)
        return b"".join(parts)

    def close(self) -> None:
        os.close(self._fd)


class GzipSource:
    """Decompressed view of a gzip file that can only move forward (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self._gz = gzip.open(path, "rb")
        self._buf = bytearray()
        self._start = 0  # offset of _buf[0] in the decompressed stream
        self._eof = False

    def read_at(self, offset: int, size: int) -> bytes:
        if offset < self._start:
            raise RuntimeError(f"gzip input read backwards (offset {offset} < {self._start})")
        drop = offset - self._start
        if drop >= len(self._buf):
            skip = drop - len(self._buf)
            self._buf.clear()
            self._start = offset - skip
            while skip > 0 and not self._eof:
                data = self._gz.read(min(skip, 1 << 22))
                if not data:
                    self._eof = True
                    break
                skip -= len(data)
                self._start += len(data)
            if skip > 0:
                return b""
        else:
            del self._buf[:drop]
            self._start = offset
        while len(self._buf) < size and not self._eof:
            data = self._gz.read(max(size - len(self._buf), 1 << 20))
            if not data:
                self._eof = True
            self._buf += data
        return bytes(self._buf[:size])

    def close(self) -> None:
        self._gz.close()


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == _GZIP_MAGIC


def open_source(path: Path) -> ByteSource:
    return GzipSource(path) if is_gzip(path) else PlainSource(path)


def detect_format(path: Path) -> int:
    """FASTA or FASTQ from the first non-blank character; `InputError` otherwise."""
    source = open_source(path)
    try:
        head = source.read_at(0, 1 << 16)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"--input {path}: cannot read it ({exc})") from None
    finally:
        source.close()
    stripped = head.lstrip()
    if not stripped:
        raise InputError(f"--input {path} is empty: no FASTA or FASTQ records")
    first = stripped[:1]
    if first == b">":
        return FASTA
    if first == b"@":
        return FASTQ
    raise InputError(
        f"--input {path} is neither FASTA (starts with '>') nor FASTQ (starts with '@'): "
        f"it starts with {first.decode('latin-1')!r}"
    )


def _line_start_at_or_after(buf: bytes, i: int) -> int:
    """Index of the first line start >= i in `buf` (len(buf) if none)."""
    if i == 0 or buf[i - 1 : i] == b"\n":
        return i
    nl = buf.find(b"\n", i)
    return len(buf) if nl < 0 else nl + 1


def _record_start(buf: bytes, i: int, fmt: int, at_eof: bool) -> int | None:
    """First record start >= i in `buf` (whose first byte is a line start or follows one);
    len(buf) at the end of the data; None if `buf` is too short to decide."""
    p = _line_start_at_or_after(buf, i)
    while p < len(buf):
        if fmt == FASTA:
            if buf[p] == 0x3E:  # '>'
                return p
        elif buf[p] == 0x40:  # '@'
            seq = buf.find(b"\n", p)
            sep = buf.find(b"\n", seq + 1) if seq >= 0 else -1
            if sep < 0 or sep + 1 >= len(buf):
                if not at_eof:
                    return None
                return len(buf)  # an '@' line too close to the end to be a record start
            if buf[sep + 1] == 0x2B:  # '+'
                return p
        nl = buf.find(b"\n", p)
        if nl < 0:
            break
        p = nl + 1
    return len(buf) if at_eof else None


def read_chunk(
    source: ByteSource, index: int, chunk_bytes: int, fmt: int
) -> tuple[int, bytes] | None:
    """``(offset, bytes)`` of the records of chunk `index`, or None past the end of the data.

    Reads from one byte before the chunk (to know whether its first byte starts a line) and
    grows the read until the next chunk's first record start is found.
    """
    lo = index * chunk_bytes
    hi = lo + chunk_bytes
    base = max(0, lo - 1)
    want = hi - base + (1 << 16)
    while True:
        buf = source.read_at(base, want)
        at_eof = len(buf) < want
        if lo >= base + len(buf) and at_eof:
            return None
        start = _record_start(buf, lo - base, fmt, at_eof)
        end = _record_start(buf, hi - base, fmt, at_eof) if hi - base <= len(buf) else None
        if end is None and at_eof:
            end = len(buf)
        if start is not None and end is not None:
            start = min(start, end)
            return base + start, buf[start:end]
        want *= 2
