"""What a pipeline needs to know to run each kernel: parameters, input, argv, main result.

One entry per kernel, so the pipeline can stay kernel-agnostic:

=======  ==========================  ===========================  ===================
kernel   staged input                main result (in ``--out``)   other outputs
=======  ==========================  ===========================  ===================
heat     initial field ``.npy``      ``field.npy``                manifest (total heat)
var      portfolio ``.json``         ``result.json``              --
kmer     FASTA/FASTQ (maybe ``.gz``) ``counts.tsv``               ``histogram.tsv``
=======  ==========================  ===========================  ===================

Every kernel also writes ``manifest.json`` (files with sha256, parameters, ranks, timings)
and takes the same ``--checkpoint-dir DIR --checkpoint-every K --restart`` flags.

The parameter models validate a spec's ``kernel.parameters`` before anything runs, with the
same limits the kernels enforce (so a bad value is refused up front, naming the field).
`make_input` generates a deterministic default input for a parameter set (the pipeline uploads
it once and stages it like any user input); `KernelInfo.input_key` names it so identical
parameters reuse the same object.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Boundary = Literal["dirichlet", "periodic"]
# Strict: a YAML ``true`` is not the integer 1, nor is ``2.5`` (or "3") an integer.
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
Count = Annotated[int, Field(ge=0, strict=True)]
Real = Annotated[float, Field(strict=True)]  # an int is still a float; a bool is not
Flag = Annotated[bool, Field(strict=True)]


class HeatParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nx: PositiveInt
    ny: PositiveInt
    nz: PositiveInt | None = None
    steps: Count
    alpha: Annotated[Real, Field(gt=0, le=0.25)] = 0.2
    bc_x: Boundary = "dirichlet"
    bc_y: Boundary = "dirichlet"
    bc_z: Boundary = "dirichlet"
    diag_every: Count = 1
    seed: Count = 0  # of the generated initial field

    @model_validator(mode="after")
    def _three_d_rules(self) -> HeatParameters:
        if self.nz is None and self.bc_z != "dirichlet":
            raise ValueError("bc_z needs nz (a 2D run has no z axis)")
        if self.nz is not None and self.alpha > 1 / 6:
            raise ValueError(f"alpha must be <= 1/6 in 3D for stability, got {self.alpha}")
        return self


class VarParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    paths: PositiveInt
    seed: Count = 0
    confidence: Annotated[Real, Field(gt=0, lt=1)] = 0.99
    dist: Literal["normal", "t"] = "normal"
    df: Annotated[Real, Field(gt=2)] = 5.0
    block_paths: PositiveInt = 1 << 16


class KmerParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    k: Annotated[int, Field(ge=1, le=31, strict=True)]
    top: Count = 100
    chunk_bytes: Annotated[int, Field(gt=0, le=256 << 20, strict=True)] = 4 << 20
    # The generated sample input (used when the spec names no input of its own).
    genome_length: PositiveInt = 1_000_000
    reads: Count = 50_000
    read_length: PositiveInt = 150
    format: Literal["fastq", "fasta"] = "fastq"
    gzip: Flag = True
    seed: Count = 0


def _heat_argv(p: HeatParameters, input_path: Path) -> list[str]:
    argv = ["--nx", str(p.nx), "--ny", str(p.ny), "--steps", str(p.steps),
            "--alpha", repr(p.alpha), "--bc-x", p.bc_x, "--bc-y", p.bc_y,
            "--diag-every", str(p.diag_every), "--in", str(input_path)]
    if p.nz is not None:
        argv += ["--nz", str(p.nz), "--bc-z", p.bc_z]
    return argv


def _var_argv(p: VarParameters, input_path: Path) -> list[str]:
    return ["--paths", str(p.paths), "--seed", str(p.seed), "--confidence", repr(p.confidence),
            "--dist", p.dist, "--df", repr(p.df), "--block-paths", str(p.block_paths),
            "--portfolio", str(input_path)]


def _kmer_argv(p: KmerParameters, input_path: Path) -> list[str]:
    return ["--input", str(input_path), "--k", str(p.k), "--top", str(p.top),
            "--chunk-bytes", str(p.chunk_bytes)]


def _heat_input(p: HeatParameters, path: Path) -> Path:
    import numpy as np

    from mpi_jobs.initial_conditions import heat_hotspots
    from mpi_jobs.manifest import atomic_save_npy

    if p.nz is None:
        field = heat_hotspots(p.ny, p.nx, seed=p.seed)
    else:  # a stack of 2D hot-spot planes, each from its own seed
        field = np.stack([heat_hotspots(p.ny, p.nx, seed=p.seed + z) for z in range(p.nz)])
    return atomic_save_npy(path, field)


def _var_input(p: VarParameters, path: Path) -> Path:
    from mpi_jobs.manifest import atomic_write
    from mpi_jobs.portfolio import DEFAULT_PORTFOLIO

    data = DEFAULT_PORTFOLIO.read_bytes()
    return atomic_write(path, lambda fh: fh.write(data))


def _kmer_input(p: KmerParameters, path: Path) -> Path:
    from mpi_jobs.genome import write_reads

    return write_reads(path, genome_length=p.genome_length, reads=p.reads,
                       read_length=p.read_length, seed=p.seed, fmt=p.format, compress=p.gzip)


def _heat_key(p: HeatParameters) -> str:
    shape = f"{p.nz}x{p.ny}x{p.nx}" if p.nz is not None else f"{p.ny}x{p.nx}"
    # Seed 0 keeps the name the pipeline has always used for 2D inputs.
    return f"heat-{shape}.npy" if p.seed == 0 else f"heat-{shape}-seed{p.seed}.npy"


def _var_key(p: VarParameters) -> str:
    return "var-portfolio-default.json"


def _kmer_key(p: KmerParameters) -> str:
    suffix = ("fastq" if p.format == "fastq" else "fa") + (".gz" if p.gzip else "")
    return (f"kmer-g{p.genome_length}-r{p.reads}x{p.read_length}-s{p.seed}.{suffix}"
            if p.reads else f"kmer-genome{p.genome_length}-s{p.seed}.{suffix}")


# --------------------------------------------------------------------------- memory
# What a job needs in memory, from its parameters alone, so a run that cannot fit is refused
# before anything is created (`flows.resource_checks`). Each estimate is the peak of the whole
# job with all ranks on one machine: the ranks' arrays, rank 0's extra for gathering results,
# the interpreter every rank carries, and the pipeline's own generation of the default input
# (that happens first, in the pipeline's process). Estimates err high where the kernel's use
# depends on data (k-mer tables); they are not exact, only the right order of magnitude.

# Peak RSS of a rank on a tiny problem: Python + numpy + mpi4py + Open MPI + numba's compiled
# kernel (measured with /usr/bin/time on Python 3.11, Open MPI 5: heat 172, var 119-179, kmer
# 185-196 MiB). RSS counts shared library pages in every rank, so this errs high.
RANK_OVERHEAD = 200 << 20
_F8 = 8  # float64 / uint64 / int64


def _balanced_dims(ranks: int, ndim: int) -> list[int]:
    """A process grid like MPI_Dims_create's: prime factors, largest first, to the smallest."""
    dims = [1] * ndim
    n, f, factors = ranks, 2, []
    while f * f <= n:
        while n % f == 0:
            factors.append(f)
            n //= f
        f += 1
    if n > 1:
        factors.append(n)
    for f in sorted(factors, reverse=True):
        dims[dims.index(min(dims))] *= f
    return sorted(dims, reverse=True)


def _heat_memory(p: HeatParameters, ranks: int) -> int:
    shape = [p.nx, p.ny] + ([p.nz] if p.nz is not None else [])
    cells = math.prod(shape)
    dims = _balanced_dims(ranks, len(shape))
    padded = math.prod(-(-n // d) + 2 for n, d in zip(sorted(shape, reverse=True), dims,
                                                      strict=True))
    block = cells // ranks + 1
    # Every rank: the field and its update, with ghost layers (u, new), its block of the
    # memory-mapped input (page cache, but in its RSS) and its block made contiguous for the
    # final gather. Rank 0 also: the gathered flat buffer and the assembled field. (Measured,
    # 4000x4000 on 2 ranks: 424 + 587 MiB peak RSS; this gives 1132 MiB.)
    run = ranks * (2 * padded + 2 * block) * _F8 + 2 * cells * _F8 + ranks * RANK_OVERHEAD
    # The default input: a 2D plane costs ~8 arrays of its size while built (mgrid's ints and
    # floats, the field, the expression's temporaries; measured ~5); 3D stacks nz planes.
    plane = p.nx * p.ny
    make_input = (8 * plane if p.nz is None else 2 * cells + 8 * plane) * _F8
    return max(run, make_input)


# Asset count of the bundled portfolio (the default input); a user's own portfolio is read
# only once staged, so its size is not known here.
_DEFAULT_ASSETS = 8


def _var_memory(p: VarParameters, ranks: int) -> int:
    c = Fraction(Decimal(str(p.confidence)))
    tail = p.paths - max(1, math.ceil(c * p.paths)) + 1  # montecarlo.tail_size
    block = min(p.block_paths, p.paths)
    compact_at = max(2 * tail, 1 << 20)  # var.py: pending losses compacted at this many
    # Per rank: one block's normals, chi-square draws and losses; pending losses plus the kept
    # tail, concatenated and partitioned (two more copies).
    per_rank = (block * (_DEFAULT_ASSETS + 2) + 3 * (tail + compact_at + block)) * _F8
    # Rank 0: every rank's tail gathered, merged with its own and partitioned. (Measured, 2^24
    # paths at 0.9 on 2 ranks: 360 + 299 MiB peak RSS; this gives 746 MiB.)
    root = (ranks * tail + 2 * (ranks + 1) * tail) * _F8
    return ranks * (per_rank + RANK_OVERHEAD) + root


_READ_ERROR_RATE = 0.005  # genome.simulate_reads
_MINIMIZER = 9  # mpi_jobs/kmer_bins.py: MINIMIZER
_DUMP_BLOCK = 65_536  # entries a rank sends per merge block (mpi_jobs/kmer_dump.py)


def _kmer_memory(p: KmerParameters, ranks: int) -> int:
    # k-mers in the generated sample, and how many can be distinct: at most the genome's own
    # plus the ones each read's substitution errors make new (each error touches up to k k-mers;
    # counted at 1.5x the expected errors), and never more than the canonical k-mers of size k.
    per_read = max(0, p.read_length - p.k + 1)
    if p.reads:
        occurrences = p.reads * per_read
        with_errors = p.genome_length + int(
            p.reads * min(per_read, 1.5 * _READ_ERROR_RATE * p.read_length * p.k))
    else:
        occurrences = with_errors = max(0, p.genome_length - p.k + 1)
    canonical = (4**p.k + (4 ** (p.k // 2) if p.k % 2 == 0 else 0)) // 2
    distinct = min(occurrences, with_errors, canonical)
    owned = -(-distinct * 11 // (10 * ranks))  # bins hashed over ranks, with 10% imbalance
    # Every occurrence is kept until the input is read, as a super-k-mer record
    # (mpi_jobs/kmer_bins.py): 1 length byte and k + run - 1 bases at 2 bits each for a run
    # of k-mers sharing a minimizer; runs average (w + 1) / 2 k-mers for a window of
    # w = k - m + 1 m-mers (taken at half that, to err high). 6.8 measured at k = 21.
    run = max(1.0, (p.k - min(p.k, _MINIMIZER) + 2) / 4)
    record_bytes = (2 + (p.k + run - 1) / 4) / run
    store = int(occurrences * record_bytes * 1.1 / ranks)
    # One round's buffers: the chunk (and its bytes joined), a uint64 code and a flag per
    # input byte at worst (FASTA), the record arrays and the packed records (~14 B a byte),
    # and a bin's hash table, which stays cache-sized (16 MiB is generous).
    per_rank = store + 14 * p.chunk_bytes + (16 << 20)
    if p.top == 0:
        # The full dump: every (code, count) of the rank's bins (16 B), concatenated and
        # sorted once more (mpi_jobs/kmer_dump.py) before rank 0 merges 65,536-entry blocks
        # from every rank, writing as it goes, so no rank holds the whole output.
        per_rank += owned * 3 * 2 * _F8
        root = ranks * _DUMP_BLOCK * (64 + p.k)
    else:
        # Only the top candidates are kept per rank; rank 0 gathers the top lists (arrays,
        # Python ints, decoded str objects, the formatted lines and their join: ~400 B each).
        per_rank += (4 * p.top + 4096) * 3 * 2 * _F8
        root = min(distinct, ranks * p.top) * (400 + p.k)
    # The default input: the genome and the per-read draws (records are streamed to disk).
    make_input = 16 * p.genome_length + 16 * p.reads
    return max(ranks * (per_rank + RANK_OVERHEAD) + root, make_input)


@dataclass(frozen=True)
class KernelInfo:
    name: str
    module: str
    parameters: type[BaseModel]
    main_result: str
    outputs: tuple[str, ...]
    _argv: Callable[[Any, Path], list[str]]
    _make_input: Callable[[Any, Path], Path]
    _input_key: Callable[[Any], str]
    _memory: Callable[[Any, int], int]

    def validate(self, parameters: dict[str, Any]) -> BaseModel:
        return self.parameters.model_validate(parameters)

    def argv(
        self,
        parameters: dict[str, Any] | BaseModel,
        input_path: Path,
        out_dir: Path,
        *,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int | None = None,
        restart: bool = False,
    ) -> list[str]:
        """Arguments after ``python -m <module>``."""
        p = parameters if isinstance(parameters, BaseModel) else self.validate(parameters)
        argv = [*self._argv(p, Path(input_path)), "--out", str(out_dir)]
        if checkpoint_dir is not None:
            argv += ["--checkpoint-dir", str(checkpoint_dir)]
            if checkpoint_every is not None:
                argv += ["--checkpoint-every", str(checkpoint_every)]
            if restart:
                argv.append("--restart")
        return argv

    def make_input(self, parameters: dict[str, Any] | BaseModel, path: Path) -> Path:
        """Write the deterministic default input for `parameters` to `path` (atomically)."""
        p = parameters if isinstance(parameters, BaseModel) else self.validate(parameters)
        return self._make_input(p, Path(path))

    def input_key(self, parameters: dict[str, Any] | BaseModel) -> str:
        """A file name for the default input that changes whenever its content would."""
        p = parameters if isinstance(parameters, BaseModel) else self.validate(parameters)
        return self._input_key(p)

    def memory_estimate(self, parameters: dict[str, Any] | BaseModel, ranks: int) -> int:
        """Peak bytes of a job with `ranks` ranks on one machine (see "memory" above)."""
        if ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {ranks}")
        p = parameters if isinstance(parameters, BaseModel) else self.validate(parameters)
        return self._memory(p, ranks)


KERNELS: dict[str, KernelInfo] = {
    "heat": KernelInfo("heat", "mpi_jobs.heat", HeatParameters, "field.npy",
                       ("field.npy",), _heat_argv, _heat_input, _heat_key,
                       _heat_memory),
    "var": KernelInfo("var", "mpi_jobs.var", VarParameters, "result.json",
                      ("result.json",), _var_argv, _var_input, _var_key,
                      _var_memory),
    "kmer": KernelInfo("kmer", "mpi_jobs.kmer", KmerParameters, "counts.tsv",
                       ("counts.tsv", "histogram.tsv"), _kmer_argv, _kmer_input, _kmer_key,
                       _kmer_memory),
}
