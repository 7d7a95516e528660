"""FASTA/FASTQ input for the k-mer kernel: format detection and chunking.

The input is cut into fixed-size byte chunks, ``chunk j = [j*C, (j+1)*C)``, and both ends of
each chunk are moved by one rule, ``cut(x)``, applied to ``j*C`` and ``(j+1)*C``. Neighbouring
chunks agree on their shared boundary, so every byte belongs to exactly one chunk, however the
chunks are spread over ranks, and chunk 0 always starts at byte 0 (nothing before the first
recognised record can be skipped). Rank r reads chunks r, r+N, r+2N, ...

FASTA (``cut`` never scans forward, so one long chromosome costs what many short records do):
    ``cut(x) = x`` unless x lies in a header line, then the start of that header. A chunk may
    thus start inside a sequence line; it comes with its `Chunk.context`, the up to k-1
    sequence bytes before it, so k-mers spanning the cut are counted once, by this chunk. The
    line start is looked for at most `LOOKBACK` bytes back: headers longer than
    `mpi_jobs.kmer_numba.MAX_HEADER_BYTES` are refused by the parser, which makes this exact.
FASTQ (4-line records; the cut is the next record start at or after x):
    A record start is a line beginning with ``@`` whose next-but-one line begins with ``+``.
    A quality line may also begin with ``@``, but the line two below a quality line is the
    next record's sequence, which never begins with ``+``: the rule is unambiguous for 4-line
    FASTQ. Multi-line (wrapped) FASTQ is refused, not guessed at: bytes the rule does not
    recognise (a wrapped record, a missing ``+`` line, a truncated last record) stay in the
    chunk before them, whose strict 4-line parser reports them with their line number. So a
    run either parses every record of the file or fails; it never drops one.

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
from typing import NamedTuple, Protocol

FASTA, FASTQ = 0, 1
# How far back a FASTA chunk boundary looks for its line start; twice the longest header.
LOOKBACK = 1 << 16
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


class Chunk(NamedTuple):
    offset: int  # file (decompressed stream) offset of data[0]
    data: bytes
    context: bytes = b""  # FASTA: the sequence bytes just before `offset` in its record
    in_record: bool = False  # FASTA: `data` starts inside a record's sequence


def read_chunk(
    source: ByteSource, index: int, chunk_bytes: int, fmt: int, k: int = 1
) -> Chunk | None:
    """The bytes of chunk `index` (see the module doc), or None past the end of the data."""
    if fmt == FASTA:
        return _read_fasta_chunk(source, index, chunk_bytes, k)
    return _read_fastq_chunk(source, index, chunk_bytes)


def _read_fastq_chunk(source: ByteSource, index: int, chunk_bytes: int) -> Chunk | None:
    """Reads from one byte before the chunk (to know whether its first byte starts a line) and
    grows the read until the next chunk's first record start is found."""
    lo = index * chunk_bytes
    hi = lo + chunk_bytes
    base = max(0, lo - 1)
    want = hi - base + (1 << 16)
    while True:
        buf = source.read_at(base, want)
        at_eof = len(buf) < want
        if lo >= base + len(buf) and at_eof:
            return None
        start = 0 if lo == 0 else _record_start(buf, lo - base, FASTQ, at_eof)
        end = _record_start(buf, hi - base, FASTQ, at_eof) if hi - base <= len(buf) else None
        if end is None and at_eof:
            end = len(buf)
        if start is not None and end is not None:
            start = min(start, end)
            return Chunk(base + start, buf[start:end])
        want *= 2


def _fasta_cut(buf: bytes, i: int, base: int) -> int:
    """``cut`` of the module doc for ``buf[i]`` (`buf` starts at file offset `base`, holds at
    least `LOOKBACK` bytes before i unless it starts the file, and ends at or after i)."""
    if i >= len(buf):
        return len(buf)
    nl = buf.rfind(b"\n", max(0, i - LOOKBACK), i)
    if nl < 0 and not (base == 0 and i <= LOOKBACK):
        return i  # a line longer than LOOKBACK: sequence (a header that long is refused)
    line = nl + 1
    return line if buf[line : line + 1] == b">" else i


def _fasta_context(buf: bytes, start: int, k: int, at_file_start: bool) -> bytes | None:
    """The last k-1 sequence bytes before ``buf[start]`` within its record (fewer at the
    record's start); None if `buf` ran out first (the caller reads further back)."""
    need = k - 1
    parts: list[bytes] = []
    pos = start
    while need > 0:
        nl = buf.rfind(b"\n", 0, pos)
        if nl < 0 and not at_file_start:  # this line starts before `buf`
            piece = buf[:pos].replace(b"\r", b"")
            if len(piece) < need:
                return None
            parts.append(piece[-need:])
            break
        line = buf[nl + 1 : pos]
        if line.startswith(b">"):
            break  # the record starts here
        piece = line.replace(b"\r", b"")[-need:]
        parts.append(piece)
        need -= len(piece)
        if nl < 0:
            break
        pos = nl
    return b"".join(reversed(parts))


def _read_fasta_chunk(source: ByteSource, index: int, chunk_bytes: int, k: int) -> Chunk | None:
    lo = index * chunk_bytes
    hi = lo + chunk_bytes
    back = LOOKBACK + 1
    while True:
        base = max(0, lo - back)
        buf = source.read_at(base, hi + 1 - base)
        if lo >= base + len(buf):
            return None
        start = _fasta_cut(buf, lo - base, base)
        end = _fasta_cut(buf, hi - base, base)
        if start == end:
            return Chunk(base + start, b"")
        if base + start == 0:
            return Chunk(0, buf[:end])
        context = _fasta_context(buf, start, k, base == 0)
        if context is None:
            # Under `back` bytes before the chunk hold fewer than k-1 sequence bytes and no
            # header (blank lines): read further back. Rare, and never for gzip: a gzip source
            # reads forward only, so there it is refused.
            if not isinstance(source, PlainSource):
                raise InputError(
                    f"more than {back} bytes of blank lines inside a FASTA record at byte "
                    f"{base + start}; not supported for gzip input"
                )
            back *= 2
            continue
        return Chunk(base + start, buf[start:end], context or b"", True)


def line_number(path: Path, offset: int) -> int:
    """1-based line number of byte `offset` of the (decompressed) input: error messages only,
    so it may read the file up to there again."""
    source = open_source(path)
    try:
        lines, pos = 1, 0
        while pos < offset:
            block = source.read_at(pos, min(1 << 22, offset - pos))
            if not block:
                break
            lines += block.count(b"\n")
            pos += len(block)
        return lines
    finally:
        source.close()
