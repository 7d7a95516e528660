"""One-line messages for a malformed k-mer input, naming the file, the line and the fault.

Apart from the kernel because only the error path needs them: they read the input again up to
the fault to count lines, which the hot path never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpi_jobs.fastx import Chunk


def _lines_at(data: bytes, offset: int, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        if offset >= len(data):
            break
        nl = data.find(b"\n", offset)
        nl = len(data) if nl < 0 else nl
        out.append(data[offset:nl].rstrip(b"\r"))
        offset = nl + 1
    return out


_FOUR_LINES = ("FASTQ records must be 4 lines (header, sequence, '+', quality); wrapped "
               "multi-line FASTQ is not supported: unwrap it first (e.g. seqtk seq)")


def describe_error(path: Path, chunk: Chunk, err: int, at: int, record_at: int) -> str:
    """One line naming the file, the line number and the fault (error path only: it reads
    the input again up to the fault to count lines)."""
    from mpi_jobs.fastx import line_number
    from mpi_jobs.kmer_numba import (
        ERR_HEADER,
        ERR_HEADER_LONG,
        ERR_PLUS_TITLE,
        ERR_QUALITY,
        ERR_QUALITY_CHAR,
        ERR_SEPARATOR,
        MAX_HEADER_BYTES,
    )

    data = chunk.data
    line_no = line_number(path, chunk.offset + at)
    if err == ERR_HEADER_LONG:
        return (f"--input {path} line {line_no}: FASTA header longer than {MAX_HEADER_BYTES} "
                "bytes; shorten the header lines")
    lines = _lines_at(data, record_at, 4)
    if err == ERR_HEADER:
        head = lines[0][:40].decode("utf-8", "replace") if lines else ""
        return (f"--input {path} line {line_no}: malformed FASTQ: expected a header line "
                f"starting with '@', got {head!r}; {_FOUR_LINES}")
    name = lines[0][1:].split(maxsplit=1)[0].decode("utf-8", "replace") if lines else ""
    where = f"--input {path} line {line_no}: malformed FASTQ record {name!r}"
    if err == ERR_SEPARATOR:
        return f"{where}: its third line must start with '+'; {_FOUR_LINES}"
    if err == ERR_PLUS_TITLE:
        plus = _lines_at(data, at, 1)[0][:40].decode("utf-8", "replace")
        return (f"{where}: its '+' line {plus!r} names another record (it may only repeat "
                "the header's title or be a bare '+')")
    if err == ERR_QUALITY_CHAR:
        return (f"{where}: the quality line holds byte {data[at]:#04x}, which is not a quality "
                "character ('!' to '~')")
    if err == ERR_QUALITY and len(lines) == 4:
        return (f"{where}: the quality line has {len(lines[3])} characters but the sequence "
                f"has {len(lines[1])}")
    return f"{where}: the record is truncated; {_FOUR_LINES}"
