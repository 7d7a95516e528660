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
own chunks). Each round, every rank parses one chunk and encodes each k-mer free of non-ACGT
characters (`mpi_jobs.kmer_numba`), cuts the reads into super-k-mers, runs of consecutive
k-mers that share their minimizer, packs them 2 bits a base and sorts them by the bin their
minimizer picks; one ``MPI_Alltoallv`` sends each bin's records to the rank that owns the bin
(`mpi_jobs.kmer_bins`). Once the input is read, each rank counts its bins one at a time in a
hash table small enough to stay in cache, folding each into the histogram and top list. A
k-mer and its reverse complement have the same minimizer, so each canonical k-mer (the
lexicographic min of the two) is counted in exactly one bin on one rank; the per-rank top
lists and histograms merge exactly on rank 0, and counts are integers, so the result equals
a serial count for any rank count.

Checkpoints (``--checkpoint-dir``): every ``--checkpoint-every`` rounds each rank saves the
records it has received, their bin offsets and the round number; ``--restart`` continues with
the next round. Bin ownership depends on the rank count, so a restart needs the same number
of ranks (the checkpoint says how many if it differs).

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
import os
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mpi_jobs.kmer_errors import describe_error
from mpi_jobs.kmer_store import (
    Results,
    Store,
    bins_per_rank,
    count_bins,
    projected_store,
    top_by_count,
)
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


PROG = "kmer"
FAIL_RANK_ENV = "CLUSTERFLOW_KMER_FAIL_RANK"
MAX_K = 31
DEFAULT_CHUNK_BYTES = 4 << 20  # fewer rounds: each is 3 collectives, a wait on a busy machine
MAX_CHUNK_BYTES = 256 << 20  # keeps every Alltoallv count (uint32 words) below 2**31
# Phases timed per rank: read a chunk, parse + encode it, cut it into super-k-mers by bin
# and pack them (`mpi_jobs.kmer_bins`), agree on errors/end (one allgather a round, which
# also absorbs load imbalance), Alltoallv to the owners, count the bins after the last round,
# and everything after that (top/dump, gather, write).
# Before those, per rank: "startup", from the process's start to the kernel's first line
# (interpreter, imports, MPI_Init), and "jit", loading numba's cached machine code (or
# compiling it, the first time after a source change).
PHASES = ("startup", "jit", "read", "parse", "split", "agree", "exchange", "count", "output")


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


def _exchange(
    comm: MPI.Intracomm, sendbuf: np.ndarray, bin_bytes: np.ndarray, part_bytes: np.ndarray,
    store: Store,
) -> None:
    """Send each owner its bins' records (one ``Alltoall`` of per-bin byte counts, one
    ``Alltoallv`` of the records as uint32 words) straight into this rank's `store`."""
    from mpi4py import MPI

    size = comm.Get_size()
    per = bin_bytes.size // size
    recv_bins = np.empty(bin_bytes.size, dtype=np.int64)
    comm.Alltoall([bin_bytes, MPI.INT64_T], [recv_bins, MPI.INT64_T])
    recv_bins = recv_bins.reshape(size, per)
    recv_bytes = (recv_bins.sum(axis=1) + 3) & ~3
    send_words = (part_bytes // 4).astype(np.int32)
    recv_words = (recv_bytes // 4).astype(np.int32)
    sdispls = np.concatenate([[0], np.cumsum(send_words)[:-1]]).astype(np.int32)
    rdispls = np.concatenate([[0], np.cumsum(recv_words)[:-1]]).astype(np.int32)
    total = int(recv_bytes.sum())
    at = store.reserve(total)
    words = store.data[at : at + total].view(np.uint32)
    comm.Alltoallv(
        [sendbuf[: int(part_bytes.sum())].view(np.uint32), (send_words, sdispls), MPI.UINT32_T],
        [words, (recv_words, rdispls), MPI.UINT32_T],
    )
    for src in range(size):
        if recv_bins[src].any():
            store.add_block(at + 4 * int(rdispls[src]), recv_bins[src])


def _process_age() -> float:
    """Seconds since this process started (Linux /proc; 0.0 where that is unavailable)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in
                    Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return max(0.0, time.time() - (boot + ticks / os.sysconf("SC_CLK_TCK")))
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


def _warm_up(k: int) -> None:
    """Call every compiled function once on a tiny input, so loading numba's cache (or
    compiling) is timed as its own phase instead of inside the first round."""
    from mpi_jobs.kmer_bins import count_bin, minimizer_length, pack_runs, split_runs, table_items
    from mpi_jobs.kmer_dump import format_lines
    from mpi_jobs.kmer_numba import BASE_CODES, extract

    data = np.frombuffer(b"@r\n" + b"ACGT" * 8 + b"\n+\n" + b"I" * 32 + b"\n", dtype=np.uint8)
    codes = np.empty(data.size, dtype=np.uint64)
    starts = np.empty(data.size, dtype=np.uint8)
    n = extract(data, 1, k, BASE_CODES, codes, starts=starts)[0]
    first = np.empty(data.size, dtype=np.int64)
    length = np.empty(data.size, dtype=np.int32)
    bins = np.empty(data.size, dtype=np.int32)
    runs = split_runs(codes, starts, n, k, minimizer_length(k), 1, first, length, bins)
    out = np.empty(data.size * 9 + 4, dtype=np.uint8)
    bin_bytes = np.zeros(1, dtype=np.int64)
    total = pack_runs(codes, first, length, bins, runs, k, 1, 1, out, bin_bytes,
                      np.zeros(1, dtype=np.int64))
    offsets = np.array([[0, total]], dtype=np.int64)
    table, rows, used = count_bin(out, offsets, 0, k, np.empty((16, 2), dtype=np.uint64), 16)
    keys, vals = table_items(table, rows, used)
    format_lines(keys, vals, k, np.empty(keys.size * (k + 22), dtype=np.uint8))


# --------------------------------------------------------------------------- kernel


def _run(argv: list[str] | None, comm: MPI.Intracomm) -> int:
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    startup = _process_age()
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
    from mpi_jobs.kmer_bins import minimizer_length, pack_runs, record_bound, split_runs
    from mpi_jobs.kmer_dump import merge_runs, send_run, sort_run
    from mpi_jobs.kmer_numba import BASE_CODES, extract

    setup: object = None
    if rank == 0:
        problem = check_readable_file("--input", args.input)
        if problem is None:
            try:
                gz = is_gzip(args.input)
                # Bins are sized from the input (4x the file for gzip, a typical ratio).
                setup = (detect_format(args.input), gz,
                         args.input.stat().st_size * (4 if gz else 1))
            except InputError as exc:
                problem = str(exc)
        problem = problem or prepare_out(args.out)
        if problem:
            setup = problem
    setup = comm.bcast(setup, root=0)
    if isinstance(setup, str):
        raise CollectiveError(setup)
    assert isinstance(setup, tuple)
    fmt, gzipped, input_bytes = setup

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

    t0 = time.perf_counter()
    _warm_up(args.k)
    jit_seconds = time.perf_counter() - t0
    per = bins_per_rank(input_bytes, size)
    nbins = per * size
    m = minimizer_length(args.k)
    # Expected record bytes this rank receives (~0.5 B per input byte: FASTQ's sequence is
    # under half of it, 2 bits a base plus the overlap of k - 1 bases a record); reserved, not
    # touched, so an overestimate costs address space, not memory.
    store = Store(per, projected=projected_store(input_bytes, args.k, size, args.chunk_bytes))
    stats = np.zeros(3, dtype=np.int64)  # records, bases, k-mer occurrences parsed here
    round_ = 0
    if checkpointer is not None and args.restart:
        ckpt = checkpointer.latest()
        if ckpt is not None:
            round_ = ckpt.step
            store.load(ckpt.load(f"records-{rank:06d}.npy"), ckpt.load(f"bins-{rank:06d}.npy"))
            stats = ckpt.load(f"stats-{rank:06d}.npy")
            if rank == 0:
                print(f"{PROG}: restarting at round {round_} ({ckpt.directory})", flush=True)
        elif rank == 0:
            print(f"{PROG}: no complete checkpoint in {args.checkpoint_dir}; starting at "
                  "round 0", flush=True)
    restarted_from = round_ if args.restart else None

    source = open_source(args.input)
    codes = np.empty(0, dtype=np.uint64)
    starts = np.empty(0, dtype=np.uint8)
    first = np.empty(0, dtype=np.int64)
    length = np.empty(0, dtype=np.int32)
    bins = np.empty(0, dtype=np.int32)
    sendbuf = np.empty(0, dtype=np.uint8)
    bin_bytes = np.zeros(nbins, dtype=np.int64)
    part_bytes = np.zeros(size, dtype=np.int64)
    timer = RankTimer()
    # Seconds per phase on this rank (the manifest's `phase_seconds`, slowest rank per phase):
    # what to optimise next is read off these, not guessed.
    phases = dict.fromkeys(PHASES, 0.0)
    phases["startup"], phases["jit"] = startup, jit_seconds
    try:
        while True:
            problem = None
            chunk = None
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
                n = 0
                if chunk is not None:
                    if codes.size < len(chunk.data):
                        grow = len(chunk.data)
                        codes = np.empty(grow, dtype=np.uint64)
                        starts = np.empty(grow, dtype=np.uint8)
                        first = np.empty(grow, dtype=np.int64)
                        length = np.empty(grow, dtype=np.int32)
                        bins = np.empty(grow, dtype=np.int32)
                        if size > 1:
                            sendbuf = np.empty(grow * record_bound(args.k) + 4 * size,
                                               dtype=np.uint8)
                    n, err, at, record_at, records, bases = extract(
                        np.frombuffer(chunk.data, dtype=np.uint8), fmt, args.k, BASE_CODES,
                        codes, np.frombuffer(chunk.context, dtype=np.uint8), chunk.in_record,
                        starts=starts,
                    )
                    if err:
                        problem = describe_error(args.input, chunk, err, at, record_at)
                    stats += (records, bases, n)
                t2 = time.perf_counter()
                phases["parse"] += t2 - t1
                runs = split_runs(codes, starts, n, args.k, m, nbins, first, length, bins)
                if size == 1:  # no exchange: pack straight into the store
                    at = store.reserve(n * record_bound(args.k))
                    total = pack_runs(codes, first, length, bins, runs, args.k, nbins, size,
                                      store.data[at:], bin_bytes, part_bytes)
                    store.used = at + total
                    if total:
                        store.add_block(at, bin_bytes)
                else:
                    pack_runs(codes, first, length, bins, runs, args.k, nbins, size, sendbuf,
                              bin_bytes, part_bytes)
                phases["split"] += time.perf_counter() - t2
            t0 = time.perf_counter()
            statuses = comm.allgather((problem, chunk is None))
            phases["agree"] += time.perf_counter() - t0
            for found, _ in statuses:
                if found is not None:
                    raise CollectiveError(found)
            if all(done for _, done in statuses):
                break
            if size > 1:
                with timer:
                    t0 = time.perf_counter()
                    _exchange(comm, sendbuf, bin_bytes, part_bytes, store)
                    phases["exchange"] += time.perf_counter() - t0
            round_ += 1
            if round_ == 1 and rank == failing:
                raise RuntimeError(f"injected failure ({FAIL_RANK_ENV})")
            if delay:
                time.sleep(delay)
            if checkpointer is not None and round_ % args.checkpoint_every == 0:
                checkpointer.save(
                    round_,
                    {f"records-{rank:06d}.npy": store.data[: store.used],
                     f"bins-{rank:06d}.npy": store.offsets(),
                     f"stats-{rank:06d}.npy": stats},
                    {"round": round_},
                )
    finally:
        source.close()
    del codes, starts, first, length, bins, sendbuf

    results = Results(args.top)
    with timer:
        t0 = time.perf_counter()
        count_bins(store, args.k, results)
        del store  # every bin is counted: the records are not needed any more
        phases["count"] = time.perf_counter() - t0
    t_output = time.perf_counter()
    with timer:
        hist_counts, hist_kmers = results.histogram()
        keys, vals = results.items()
        if args.top:
            top_keys, top_vals = top_by_count(keys, vals, args.top)
        else:  # the full dump: sorted here, merged on rank 0 (`mpi_jobs.kmer_dump`)
            keys, vals = sort_run(keys, vals)
    hists = comm.gather((hist_counts, hist_kmers), root=0)
    totals = np.zeros_like(stats) if rank == 0 else None
    comm.Reduce([stats, MPI.INT64_T], [totals, MPI.INT64_T] if rank == 0 else None,
                op=MPI.SUM, root=0)
    distinct = comm.reduce(results.distinct, op=MPI.SUM, root=0)
    counts_path = args.out / "counts.tsv"
    if args.top:
        tops = comm.gather((top_keys, top_vals), root=0)
        if rank == 0:
            assert tops is not None
            all_keys = np.concatenate([t[0] for t in tops])
            all_vals = np.concatenate([t[1] for t in tops])
            best_keys, best_vals = top_by_count(all_keys, all_vals, args.top)
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
    rank_cpu = comm.gather(time.process_time(), root=0)  # imports and start-up included
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
            rank_cpu_seconds=rank_cpu,
            kmers_per_second=int(totals[2]) / slowest if slowest else None,
            phase_seconds={name: max(p[name] for p in rank_phases) for name in PHASES},
            restarted_from_round=restarted_from,
            checkpoints_written=checkpointer.saved if checkpointer else 0,
        )
    comm.Barrier()
    return 0


def _single_node_transports() -> None:
    """When Open MPI's launcher says every rank is on this node, use only its shared-memory
    and self transports. Probing the others (the libfabric ``ofi`` BTL above all) took ~1 s
    of ``MPI_Init`` per run on this VM, a fifth of a 90 Mbase count. Only before ``MPI_Init``,
    only under Open MPI's own launcher (which sets these variables), never over a setting
    the user made, and never across nodes."""
    size = os.environ.get("OMPI_COMM_WORLD_SIZE")
    if size and size == os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE"):
        os.environ.setdefault("OMPI_MCA_btl", "self,sm")


def main(argv: list[str] | None = None) -> int:
    _single_node_transports()
    return run_kernel(PROG, lambda comm: _run(argv, comm))


if __name__ == "__main__":
    raise SystemExit(main())
