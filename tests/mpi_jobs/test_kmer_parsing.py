"""k-mer input integrity: no FASTQ record is ever dropped; malformed ones fail with a line number.

Issue 13 class 8 ("silent loss"): a wrapped or ``+``-less first record used to vanish (chunk 0
started at the first *recognised* record), and a file of wrapped records gave 0 records with
exit 0. The kernel now refuses any malformed record, wherever the chunk boundaries fall, and
the manifest's record count is the file's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mpi_jobs.fastx import FASTQ, PlainSource, read_chunk
from mpi_jobs.kmer_numba import BASE_CODES, ERR_NONE, extract
from tests.kernel_launch import kernel_lines, run

GOOD = [b"@r%d extra\nACGTACGGTACCA\n+\nIIIIIIIIIIIII\n" % i for i in range(1, 40)]
WRAPPED = b"@w wrapped\nACGTACG\nGTACCA\n+\nIIIIIII\nIIIIII\n"
NO_PLUS = b"@np\nACGTACGGTACCA\nIIIIIIIIIIIII\n"


def _lines_before(text: bytes, fragment: bytes) -> int:
    return text[: text.index(fragment)].count(b"\n")


def _chunks(path: Path, chunk_bytes: int) -> list[bytes]:
    source = PlainSource(path)
    out, index = [], 0
    while (chunk := read_chunk(source, index, chunk_bytes, FASTQ)) is not None:
        out.append(chunk.data)
        index += 1
    source.close()
    return out


@pytest.mark.parametrize("bad", [WRAPPED, NO_PLUS])
@pytest.mark.parametrize("where", [0, 17])
def test_every_byte_is_parsed_and_the_bad_record_fails_its_chunk(
    tmp_path: Path, bad: bytes, where: int
) -> None:
    # In-process and exhaustive over chunk sizes: the chunks always cover the whole file
    # (chunk 0 starts at byte 0 even when no record starts there) and the chunk holding the
    # malformed record reports it, so no chunking can make it disappear.
    records = list(GOOD)
    records.insert(where, bad)
    text = b"".join(records)
    path = tmp_path / "x.fastq"
    path.write_bytes(text)
    for chunk_bytes in range(1, 200, 7):
        chunks = _chunks(path, chunk_bytes)
        assert b"".join(chunks) == text, chunk_bytes
        errors = []
        for data in chunks:
            out = np.empty(len(data) + 1, dtype=np.uint64)
            result = extract(np.frombuffer(data, dtype=np.uint8), FASTQ, 5, BASE_CODES, out)
            errors.append(result[1])
        assert sum(e != ERR_NONE for e in errors) >= 1, chunk_bytes


@pytest.mark.parametrize(
    ("records", "needle", "line", "message"),
    [
        ([WRAPPED, *GOOD], b"GTACCA\n+", 3, "its third line must start with '+'"),
        ([NO_PLUS, *GOOD], b"IIIIIIIIIIIII\n@r1", 3, "its third line must start with '+'"),
        ([*GOOD[:25], WRAPPED, *GOOD[25:]], b"GTACCA\n+\nIIIIIII\n", None, "'w'"),
        ([WRAPPED.replace(b"@w", b"@w%d" % i) for i in range(30)], b"GTACCA\n+", 3, "'w0'"),
        ([*GOOD[:9], b"@c\nACGT\n+\nII\x07I\n", *GOOD[9:]], b"II\x07I", None, "0x07"),
        ([*GOOD[:30], b"@p one\nACGT\n+q one\nIIII\n", *GOOD[30:]], b"+q one", None,
         "names another record"),
        ([*GOOD, b"@t\nACGT\n+\n"], b"@t\n", None, "truncated"),
    ],
    ids=["wrapped-first", "no-plus-first", "wrapped-middle", "all-wrapped", "control-char",
         "plus-other-id", "truncated-last"],
)
def test_malformed_fastq_fails_with_its_line_number(
    tmp_path: Path, records: list[bytes], needle: bytes, line: int | None, message: str,
) -> None:
    text = b"".join(records)
    path = tmp_path / "bad.fastq"
    path.write_bytes(text)
    if line is None:
        line = _lines_before(text, needle) + 1
    # 3 ranks with chunks smaller than a record, so boundaries fall everywhere; a first-record
    # fault also on 1 rank with the default chunk (the case that used to exit 0).
    for ranks, chunk in [(3, 97)] + ([(1, 1 << 20)] if line == 3 else []):
        result = run("kmer", ranks, ["--input", str(path), "--k", "5", "--chunk-bytes",
                                     str(chunk), "--out", str(tmp_path / "out")])
        assert result.returncode == 1, result.stderr
        (reported,) = kernel_lines(result.stderr, "kmer")
        assert f"{path} line {line}:" in reported and message in reported, reported
        assert not (tmp_path / "out" / "manifest.json").exists()


def test_plus_line_repeating_the_title_and_crlf_are_accepted(tmp_path: Path) -> None:
    # The decided rules: a '+' line may repeat the header's title (Biopython accepts exactly
    # that), CRLF line ends are fine, and the record count is every record of the file.
    records = [b"@r%d some text\r\nACGTTGCA\r\n+r%d some text\r\n!!~~IIII\r\n" % (i, i)
               for i in range(50)]
    path = tmp_path / "ok.fastq"
    path.write_bytes(b"".join(records))
    out = tmp_path / "out"
    result = run("kmer", 2, ["--input", str(path), "--k", "4", "--top", "0", "--chunk-bytes",
                             "61", "--out", str(out)])
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 50 and manifest["bases"] == 400
    assert manifest["kmers"] == 50 * 5
