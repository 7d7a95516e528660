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

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Boundary = Literal["dirichlet", "periodic"]
PositiveInt = Annotated[int, Field(gt=0)]


class HeatParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nx: PositiveInt
    ny: PositiveInt
    nz: PositiveInt | None = None
    steps: Annotated[int, Field(ge=0)]
    alpha: Annotated[float, Field(gt=0, le=0.25)] = 0.2
    bc_x: Boundary = "dirichlet"
    bc_y: Boundary = "dirichlet"
    bc_z: Boundary = "dirichlet"
    diag_every: Annotated[int, Field(ge=0)] = 1
    seed: Annotated[int, Field(ge=0)] = 0  # of the generated initial field

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
    seed: Annotated[int, Field(ge=0)] = 0
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.99
    dist: Literal["normal", "t"] = "normal"
    df: Annotated[float, Field(gt=2)] = 5.0
    block_paths: PositiveInt = 1 << 16


class KmerParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    k: Annotated[int, Field(ge=1, le=31)]
    top: Annotated[int, Field(ge=0)] = 100
    chunk_bytes: Annotated[int, Field(gt=0, le=256 << 20)] = 1 << 20
    # The generated sample input (used when the spec names no input of its own).
    genome_length: PositiveInt = 1_000_000
    reads: Annotated[int, Field(ge=0)] = 50_000
    read_length: PositiveInt = 150
    format: Literal["fastq", "fasta"] = "fastq"
    gzip: bool = True
    seed: Annotated[int, Field(ge=0)] = 0


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


KERNELS: dict[str, KernelInfo] = {
    "heat": KernelInfo("heat", "mpi_jobs.heat", HeatParameters, "field.npy",
                       ("field.npy",), _heat_argv, _heat_input, _heat_key),
    "var": KernelInfo("var", "mpi_jobs.var", VarParameters, "result.json",
                      ("result.json",), _var_argv, _var_input, _var_key),
    "kmer": KernelInfo("kmer", "mpi_jobs.kmer", KmerParameters, "counts.tsv",
                       ("counts.tsv", "histogram.tsv"), _kmer_argv, _kmer_input, _kmer_key),
}
