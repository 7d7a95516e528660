"""Distributed k-mer counting of FASTA/FASTQ (plain or gzip) on MPI ranks.

Run::

    mpiexec -n N python -m mpi_jobs.kmer --input FILE --k K [--top N] --out DIR

Writes ``DIR/counts.tsv`` (``kmer<TAB>count`` lines for the N most frequent canonical k-mers,
by count descending then k-mer; ``--top 0`` writes all, streamed: each rank sorts its own
table and rank 0 merges the runs block by block, `mpi_jobs.kmer_dump`), ``DIR/histogram.tsv``
(``count<TAB>distinct k-mers with that count`` lines, by count ascending) and
``DIR/manifest.json``.

How: the input is cut into chunks that ranks take round-robin (`mpi_jobs.fastx` says where
chunks are cut: between FASTQ records, anywhere in a FASTA sequence with the k-1 bases before
the cut as context; and how gzip is handled: every rank decompresses the stream and keeps its
own chunks). Each round, every rank parses one chunk, upper-cases it,
encodes each k-mer free of non-ACGT characters and canonicalises it (lexicographic min of the
k-mer and its reverse complement), sorts the codes by owner rank (a hash of the code) and sends
them there with one ``MPI_Alltoallv``; owners count them in a hash table
(`mpi_jobs.kmer_numba`). A k-mer is counted only by its owner, so the per-rank top lists and
histograms merge exactly on rank 0; counts are integers, so the result equals a serial count
for any rank count.

Checkpoints (``--checkpoint-dir``): every ``--checkpoint-every`` rounds each rank saves its
table and the round number; ``--restart`` continues with the next round. Table ownership
depends on the rank count, so a restart needs the same number of ranks (the checkpoint says
how many if it differs).

Parse errors (a malformed FASTQ record anywhere, the first one included; a corrupt gzip stream)
are found by the rank that owns the chunk; ranks agree on them at the end of each round, so the
job stops (exit 1) with one line naming the line number and the record instead of an
``MPI_Abort``. FASTQ is strict 4-line: wrapped records are refused, never skipped, so the
manifest's ``records`` is every record of the file or the run fails.

Environment: ``CLUSTERFLOW_KMER_FAIL_RANK=R`` makes rank R fail after its first round;
``CLUSTERFLOW_STEP_DELAY_SECONDS=T`` sleeps T seconds after each round (testing aids).
"""

from __future__ import annotations

import argparse
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mpi_jobs.manifest import atomic_write, atomic_write_text, sha256_file, write_manifest
from mpi_jobs.runtime import (
    CollectiveError,
    KernelParser,
    RankTimer,
    add_checkpoint_args,
    check_checkpoint_args,
    check_readable_file,
    fail_rank,
    non_negative_int,
    positive_int,
    prepare_out,
    run_kernel,
    step_delay,
)

if TYPE_CHECKING:
    from mpi4py import MPI

    from mpi_jobs.fastx import Chunk

PROG = "kmer"
FAIL_RANK_ENV = "CLUSTERFLOW_KMER_FAIL_RANK"
MAX_K = 31
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 256 << 20  # keeps every Alltoallv count far below 2**31
# Phases timed per rank: read a chunk, parse + encode it, agree on errors/end (one allgather
# a round, which also absorbs load imbalance), partition + Alltoallv, insert into the table,
# and everything after the last round (compact, histogram, top/dump, gather, write).
PHASES = ("read", "parse", "agree", "exchange", "count", "output")


def _k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= MAX_K:
        raise argparse.ArgumentTypeError(
            f"k must be between 1 and {MAX_K} (k-mers are packed 2 bits per base into 64 "
            f"bits), got {value}"
        )
    return value


def _chunk_bytes(text: str) -> int:
    value = positive_int(text)
    if value > MAX_CHUNK_BYTES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_CHUNK_BYTES}, got {value}")
    return value


def _parse_args(argv: list[str] | None, *, quiet: bool) -> argparse.Namespace:
    parser = KernelParser(
        kernel=PROG,
        quiet=quiet,
        description="Distributed canonical k-mer counting of FASTA/FASTQ (plain or gzip). "
        "Launch with mpiexec.",
        epilog=f"Set {FAIL_RANK_ENV}=R to make rank R fail after its first round (testing).",
    )
    parser.add_argument("--input", type=Path, required=True, metavar="FILE",
                        help="FASTA or 4-line FASTQ, optionally gzip-compressed")
    parser.add_argument("--k", type=_k, required=True, help=f"k-mer length, 1..{MAX_K}")
    parser.add_argument("--top", type=non_negative_int, default=100,
                        help="k-mers in counts.tsv, 0 for all (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output directory for counts.tsv, histogram.tsv, manifest.json")
    parser.add_argument("--chunk-bytes", type=_chunk_bytes, default=DEFAULT_CHUNK_BYTES,
                        help="input bytes per chunk (one chunk per rank per round) "
                        "(default: %(default)s)")
    add_checkpoint_args(parser, unit="rounds", default_every=8)
    args = parser.parse_args(argv)
    check_checkpoint_args(parser, args)
    return args


# --------------------------------------------------------------------------- helpers


def decode(codes: np.ndarray, k: int) -> list[str]:
    """2-bit codes back to k-mer strings."""
    if codes.size == 0:
        return []
    shifts = np.arange(2 * (k - 1), -1, -2, dtype=np.uint64)
    digits = ((codes.astype(np.uint64)[:, None] >> shifts) & np.uint64(3)).astype(np.intp)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[digits]
    return [row.decode("ascii") for row in np.ascontiguousarray(letters).view(f"S{k}").ravel()]


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


def _describe_error(path: Path, chunk: Chunk, err: int, at: int, record_at: int) -> str:
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


def _exchange(
    comm: MPI.Intracomm, codes: np.ndarray, n: int, sendbuf: np.ndarray
) -> np.ndarray:
    """Send each code to its owner (one Alltoallv); return the codes this rank owns."""
    from mpi4py import MPI

    from mpi_jobs.kmer_numba import partition

    size = comm.Get_size()
    if size == 1:
        return codes[:n]
    sendcounts = np.zeros(size, dtype=np.int64)
    partition(codes, n, size, sendbuf, sendcounts)
    recvcounts = np.empty(size, dtype=np.int64)
    comm.Alltoall([sendcounts, MPI.INT64_T], [recvcounts, MPI.INT64_T])
    sdispls = np.concatenate([[0], np.cumsum(sendcounts)[:-1]]).astype(np.int32)
    rdispls = np.concatenate([[0], np.cumsum(recvcounts)[:-1]]).astype(np.int32)
    recv = np.empty(int(recvcounts.sum()), dtype=np.uint64)
    comm.Alltoallv(
        [sendbuf, (sendcounts.astype(np.int32), sdispls), MPI.UINT64_T],
        [recv, (recvcounts.astype(np.int32), rdispls), MPI.UINT64_T],
    )
    return recv


def _top(codes: np.ndarray, counts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` most frequent (all if n == 0), by count descending then k-mer.

    A partition finds the n-th largest count first, so only the candidates at or above it
    (all of the top n, plus any ties) are fully sorted.
    """
    if n and n < counts.size:
        threshold = np.partition(counts, counts.size - n)[counts.size - n]
        keep = np.flatnonzero(counts >= threshold)
        codes, counts = codes[keep], counts[keep]
    order = np.lexsort((codes, -counts))
    if n:
        order = order[:n]
    return codes[order], counts[order]


def _histogram(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(count, number of k-mers with that count) pairs, counts ascending."""
    if counts.size and counts.max() <= 1 << 24:  # bincount: linear time, bounded memory
        tally = np.bincount(counts)
        present = np.flatnonzero(tally)
        return present, tally[present]
    return np.unique(counts, return_counts=True)


# --------------------------------------------------------------------------- kernel


def _run(argv: list[str] | None, comm: MPI.Intracomm) -> int:
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    args = _parse_args(argv, quiet=rank != 0)
    t_start = time.perf_counter()
    failing = fail_rank(FAIL_RANK_ENV)
    delay = step_delay()

    from mpi_jobs.checkpoint import Checkpointer
    from mpi_jobs.fastx import (
        FORMAT_NAMES,
        InputError,
        detect_format,
        is_gzip,
        open_source,
        read_chunk,
    )
    from mpi_jobs.kmer_dump import merge_runs, send_run, sort_run
    from mpi_jobs.kmer_numba import BASE_CODES, CountTable, extract

    setup: object = None
    if rank == 0:
        problem = check_readable_file("--input", args.input)
        if problem is None:
            try:
                setup = (detect_format(args.input), is_gzip(args.input))
            except InputError as exc:
                problem = str(exc)
        problem = problem or prepare_out(args.out)
        if problem:
            setup = problem
    setup = comm.bcast(setup, root=0)
    if isinstance(setup, str):
        raise CollectiveError(setup)
    assert isinstance(setup, tuple)
    fmt, gzipped = setup

    checkpointer = None
    if args.checkpoint_dir is not None:
        fingerprint = {
            "input_sha256": sha256_file(args.input) if rank == 0 else None,
            "k": args.k,
            "chunk_bytes": args.chunk_bytes,
            "ranks": size,
        }
        fingerprint = comm.bcast(fingerprint, root=0)
        checkpointer = Checkpointer(comm, args.checkpoint_dir, PROG, fingerprint)
        problem = checkpointer.prepare_root() if rank == 0 else None
        problem = comm.bcast(problem, root=0)
        if problem:
            raise CollectiveError(problem)

    table = CountTable()
    stats = np.zeros(3, dtype=np.int64)  # records, bases, k-mer occurrences parsed here
    round_ = 0
    if checkpointer is not None and args.restart:
        ckpt = checkpointer.latest()
        if ckpt is not None:
            round_ = ckpt.step
            table.add(ckpt.load(f"keys-{rank:06d}.npy"), ckpt.load(f"counts-{rank:06d}.npy"))
            stats = ckpt.load(f"stats-{rank:06d}.npy")
            if rank == 0:
                print(f"{PROG}: restarting at round {round_} ({ckpt.directory})", flush=True)
        elif rank == 0:
            print(f"{PROG}: no complete checkpoint in {args.checkpoint_dir}; starting at "
                  "round 0", flush=True)
    restarted_from = round_ if args.restart else None

    source = open_source(args.input)
    codes = np.empty(0, dtype=np.uint64)
    sendbuf = np.empty(0, dtype=np.uint64)
    timer = RankTimer()
    # Seconds per phase on this rank (the manifest's `phase_seconds`, slowest rank per phase):
    # what to optimise next is read off these, not guessed.
    phases = dict.fromkeys(PHASES, 0.0)
    try:
        while True:
            problem = None
            chunk = None
            n = 0
            with timer:
                t0 = time.perf_counter()
                try:
                    chunk = read_chunk(source, round_ * size + rank, args.chunk_bytes, fmt,
                                       args.k)
                except (OSError, EOFError, zlib.error) as exc:
                    problem = f"--input {args.input}: cannot read it ({type(exc).__name__}: {exc})"
                except InputError as exc:
                    problem = f"--input {args.input}: {exc}"
                t1 = time.perf_counter()
                phases["read"] += t1 - t0
                if chunk is not None:
                    if codes.size < len(chunk.data):
                        codes = np.empty(len(chunk.data), dtype=np.uint64)
                        sendbuf = np.empty(len(chunk.data), dtype=np.uint64)
                    n, err, at, record_at, records, bases = extract(
                        np.frombuffer(chunk.data, dtype=np.uint8), fmt, args.k, BASE_CODES,
                        codes, np.frombuffer(chunk.context, dtype=np.uint8), chunk.in_record,
                    )
                    if err:
                        problem = _describe_error(args.input, chunk, err, at, record_at)
                    stats += (records, bases, n)
                phases["parse"] += time.perf_counter() - t1
            t0 = time.perf_counter()
            statuses = comm.allgather((problem, chunk is None))
            phases["agree"] += time.perf_counter() - t0
            for found, _ in statuses:
                if found is not None:
                    raise CollectiveError(found)
            if all(done for _, done in statuses):
                break
            with timer:
                t0 = time.perf_counter()
                owned = _exchange(comm, codes, n, sendbuf)
                t1 = time.perf_counter()
                table.add(owned)
                phases["exchange"] += t1 - t0
                phases["count"] += time.perf_counter() - t1
            round_ += 1
            if round_ == 1 and rank == failing:
                raise RuntimeError(f"injected failure ({FAIL_RANK_ENV})")
            if delay:
                time.sleep(delay)
            if checkpointer is not None and round_ % args.checkpoint_every == 0:
                keys, vals = table.items()
                checkpointer.save(
                    round_,
                    {f"keys-{rank:06d}.npy": keys, f"counts-{rank:06d}.npy": vals,
                     f"stats-{rank:06d}.npy": stats},
                    {"round": round_},
                )
    finally:
        source.close()

    t_output = time.perf_counter()
    with timer:
        keys, vals = table.items()
        del table  # the compact copy is all that is needed from here on
        hist_counts, hist_kmers = _histogram(vals)
        if args.top:
            top_keys, top_vals = _top(keys, vals, args.top)
        else:  # the full dump: sorted here, merged on rank 0 (`mpi_jobs.kmer_dump`)
            keys, vals = sort_run(keys, vals)
    hists = comm.gather((hist_counts, hist_kmers), root=0)
    totals = np.zeros_like(stats) if rank == 0 else None
    comm.Reduce([stats, MPI.INT64_T], [totals, MPI.INT64_T] if rank == 0 else None,
                op=MPI.SUM, root=0)
    distinct = comm.reduce(int(keys.size), op=MPI.SUM, root=0)
    counts_path = args.out / "counts.tsv"
    if args.top:
        tops = comm.gather((top_keys, top_vals), root=0)
        if rank == 0:
            assert tops is not None
            all_keys = np.concatenate([t[0] for t in tops])
            all_vals = np.concatenate([t[1] for t in tops])
            best_keys, best_vals = _top(all_keys, all_vals, args.top)
            counts_text = "".join(
                f"{kmer}\t{count}\n"
                for kmer, count in zip(decode(best_keys, args.k), best_vals.tolist(), strict=True)
            )
            atomic_write_text(counts_path, counts_text)
    elif rank == 0:
        atomic_write(counts_path, lambda fh: merge_runs(comm, fh, keys, vals, args.k))
    else:
        send_run(comm, keys, vals)
    phases["output"] = time.perf_counter() - t_output
    rank_seconds = comm.gather(timer.seconds, root=0)
    rank_phases = comm.gather(phases, root=0)
    if rank == 0:
        assert hists is not None and totals is not None and rank_phases is not None
        merged: dict[int, int] = {}
        for hc, hk in hists:
            for c, m in zip(hc.tolist(), hk.tolist(), strict=True):
                merged[c] = merged.get(c, 0) + m
        hist_text = "".join(f"{c}\t{m}\n" for c, m in sorted(merged.items()))
        hist_path = atomic_write_text(args.out / "histogram.tsv", hist_text)
        assert rank_seconds is not None
        slowest = max(rank_seconds)
        write_manifest(
            args.out,
            [counts_path, hist_path],
            kernel=PROG,
            parameters={"k": args.k, "top": args.top, "chunk_bytes": args.chunk_bytes,
                        "input": args.input.name},
            input={"format": FORMAT_NAMES[fmt], "gzip": gzipped},
            ranks=size,
            rounds=round_,
            records=int(totals[0]),
            bases=int(totals[1]),
            kmers=int(totals[2]),
            distinct_kmers=distinct,
            wall_seconds=time.perf_counter() - t_start,
            rank_seconds=rank_seconds,
            kmers_per_second=int(totals[2]) / slowest if slowest else None,
            phase_seconds={name: max(p[name] for p in rank_phases) for name in PHASES},
            restarted_from_round=restarted_from,
            checkpoints_written=checkpointer.saved if checkpointer else 0,
        )
    comm.Barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_kernel(PROG, lambda comm: _run(argv, comm))


if __name__ == "__main__":
    raise SystemExit(main())
