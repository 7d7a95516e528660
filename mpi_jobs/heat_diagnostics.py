"""The heat kernel's checks and records: input validation, total heat, checkpoint fingerprint.

Split out of `mpi_jobs.heat`: these are the parts that decide whether a run may start (the
input file matches the grid), what it records besides the field (the exact total heat) and
what a checkpoint must match to be resumed. They do not move field data between ranks.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mpi_jobs.manifest import sha256_file
from mpi_jobs.stencil import normalise_parts, parts_to_float

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["TotalHeat", "check_input", "fingerprint"]


def check_input(path: Path, shape: tuple[int, ...]) -> str | None:
    """Return a user-facing problem with the input file, or None if it is usable.

    Only the header is read (via mmap), so this is cheap even for huge fields.
    """
    if not path.exists():
        return f"--in {path}: no such file"
    if not path.is_file():
        return f"--in {path} is not a regular file"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        return f"--in {path} is not a readable .npy array ({exc})"
    if not isinstance(arr, np.ndarray):  # .npz archives load as NpzFile
        arr.close()
        return f"--in {path} is an .npz archive; expected a single .npy array"
    names = "(nz, ny, nx)" if len(shape) == 3 else "(ny, nx)"
    if arr.shape != shape:
        return f"--in {path} has shape {arr.shape}, expected {names} = {shape}"
    # Any byte order is fine: conversion to native float64 is exact.
    if arr.dtype.kind != "f" or arr.dtype.itemsize != 8:
        return f"--in {path} has dtype {arr.dtype}, expected float64"
    return None


class TotalHeat:
    """Per-step fixed-point sums of this rank, reduced to rank 0 in batches (no per-step sync)."""

    def __init__(self, comm: MPI.Intracomm, scale: int, every: int) -> None:
        self.comm = comm
        self.scale = scale
        self.scale_factor = math.ldexp(1.0, scale)
        self.every = every
        self.pending: list[tuple[int, int, int]] = []  # (step, H, L), this rank's block only
        self.steps: list[int] = []  # reduced, rank 0 only
        self.values: list[float] = []

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def record(self, step: int, high: int, low: int, bad: int) -> None:
        if bad:
            raise FloatingPointError(
                f"total heat out of range at step {step}: the field holds NaN/inf or grew "
                "beyond the maximum principle's bound"
            )
        self.pending.append((step, *normalise_parts(int(high), int(low))))

    def reduce(self) -> None:
        """Collective: sum the pending per-rank parts exactly (int64) onto rank 0."""
        from mpi4py import MPI

        if self.every == 0:
            return
        parts = np.array([[h, lo] for _, h, lo in self.pending], dtype=np.int64).reshape(-1, 2)
        total = np.empty_like(parts) if self.comm.Get_rank() == 0 else None
        self.comm.Reduce([parts, MPI.INT64_T], [total, MPI.INT64_T] if total is not None else None,
                         op=MPI.SUM, root=0)
        if total is not None:
            for (step, _, _), (high, low) in zip(self.pending, total.tolist(), strict=True):
                self.steps.append(step)
                self.values.append(parts_to_float(*normalise_parts(high, low), self.scale))
        self.pending.clear()


def fingerprint(args: argparse.Namespace, shape: tuple[int, ...], bc: tuple[str, ...]) -> dict:
    return {
        "shape": list(shape),
        "alpha": args.alpha,
        "bc": list(bc),
        "diag_every": args.diag_every,
        "input_sha256": sha256_file(args.input),
    }
