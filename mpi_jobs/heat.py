"""2D heat diffusion (explicit 5-point stencil) on a Cartesian MPI decomposition.

Run::

    mpiexec -n N python -m mpi_jobs.heat --nx NX --ny NY --steps S --in FILE --out DIR [--alpha A]

`FILE` is a float64 ``.npy`` array of shape ``(ny, nx)``; the domain has a Dirichlet zero
boundary. Rank 0 writes ``DIR/field.npy`` and ``DIR/manifest.json``.

The result is bitwise identical for any rank count: every cell is updated with the same
floating-point operations in the same order (see `stencil_step`), and halo values are exact
copies, so a decomposition change can never show up as round-off drift. That makes
``np.array_equal`` against `reference_solution` a meaningful regression test.

Failure model: errors that every rank detects identically (bad arguments, bad input file,
grid too small for the process grid) are reported once by rank 0 and all ranks exit cleanly.
Anything else is reported as one ``heat: rank R: ...`` line and the job is aborted with
``MPI_Abort``, because the other ranks may be blocked in a halo exchange and would otherwise
hang until the scheduler's wall-clock limit.

Environment:
    CLUSTERFLOW_HEAT_FAIL_RANK=R
        Rank R raises ``RuntimeError`` right after its first step. It exists so tests and
        operators can check that one failing rank takes the whole job down promptly instead of
        leaving its neighbours waiting. No effect when ``--steps`` is 0 or R is not a rank.

mpi4py is imported inside `main` rather than at module level, because importing ``MPI``
initialises MPI: tools that only want `reference_solution` (tests, flows) must not become MPI
singletons as a side effect.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import numpy as np

from mpi_jobs.decomposition import block_range
from mpi_jobs.manifest import atomic_save_npy, write_manifest

if TYPE_CHECKING:
    from mpi4py import MPI

PROG = "heat"
FAIL_RANK_ENV = "CLUSTERFLOW_HEAT_FAIL_RANK"
MAX_ALPHA = 0.25  # Von Neumann stability limit of the explicit 2D scheme.

# One tag per direction of travel, so a message can never be matched to the wrong ghost even if
# two ranks were neighbours along more than one side.
_NORTHWARD, _SOUTHWARD, _WESTWARD, _EASTWARD = range(4)


class CollectiveError(Exception):
    """An error that every rank raises identically, so all can exit without ``MPI_Abort``."""


# --------------------------------------------------------------------------- numerics


def stencil_step(u: np.ndarray, new: np.ndarray, alpha: float, scratch: np.ndarray) -> None:
    """Write one explicit step of the padded array `u` into the interior of `new`.

    Computes exactly ``u + alpha * ((((N + S) + W) + E) - 4.0 * u)`` per cell, as a fixed
    sequence of element-wise ufuncs. Element-wise IEEE operations are correctly rounded and
    never reassociated, so a cell's result depends only on its neighbours' values, not on the
    array's shape or which rank owns it. The ``out=`` form avoids per-step temporaries.
    The ghost ring of `new` is left alone; `scratch` has the interior's shape.
    """
    acc = new[1:-1, 1:-1]
    centre = u[1:-1, 1:-1]
    np.add(u[:-2, 1:-1], u[2:, 1:-1], out=acc)
    np.add(acc, u[1:-1, :-2], out=acc)
    np.add(acc, u[1:-1, 2:], out=acc)
    np.multiply(centre, 4.0, out=scratch)
    np.subtract(acc, scratch, out=acc)
    np.multiply(acc, alpha, out=acc)
    np.add(centre, acc, out=acc)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha <= MAX_ALPHA:
        raise ValueError(
            f"alpha must be in (0, {MAX_ALPHA}] for the explicit scheme to be stable, got {alpha}"
        )


def reference_solution(u0: np.ndarray, steps: int, alpha: float) -> np.ndarray:
    """Serial result that the MPI kernel must match bit for bit, for any rank count."""
    u0 = np.asarray(u0, dtype=np.float64)
    if u0.ndim != 2:
        raise ValueError(f"u0 must be 2D (ny, nx), got shape {u0.shape}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    _check_alpha(alpha)
    u = np.zeros((u0.shape[0] + 2, u0.shape[1] + 2))
    u[1:-1, 1:-1] = u0
    new = np.zeros_like(u)
    scratch = np.empty(u0.shape)
    for _ in range(steps):
        stencil_step(u, new, alpha, scratch)
        u, new = new, u
    return u[1:-1, 1:-1].copy()


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """Every rank parses (so all reach the same verdict); only rank 0 prints, so a typo
    yields one message instead of one per rank."""

    def __init__(self, *, quiet: bool, **kwargs: Any) -> None:
        self._quiet = quiet
        super().__init__(**kwargs)

    def print_usage(self, file: IO[str] | None = None) -> None:
        if not self._quiet:
            super().print_usage(file)

    def print_help(self, file: IO[str] | None = None) -> None:
        if not self._quiet:
            super().print_help(file)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message and not self._quiet:
            sys.stderr.write(message)
        raise SystemExit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    try:
        _check_alpha(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _parse_args(argv: list[str] | None, *, quiet: bool) -> argparse.Namespace:
    parser = _Parser(
        quiet=quiet,
        prog="python -m mpi_jobs.heat",
        description="2D heat diffusion (explicit 5-point stencil, zero Dirichlet boundary) "
        "on an MPI Cartesian process grid. Launch with mpiexec.",
        epilog=f"Set {FAIL_RANK_ENV}=R to make rank R fail after the first step (testing).",
    )
    parser.add_argument("--nx", type=_positive_int, required=True, help="grid columns")
    parser.add_argument("--ny", type=_positive_int, required=True, help="grid rows")
    parser.add_argument("--steps", type=_non_negative_int, required=True, help="time steps")
    parser.add_argument(
        "--in",
        dest="input",
        type=Path,
        required=True,
        metavar="FILE",
        help="initial field: float64 .npy of shape (ny, nx)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="output directory for field.npy and manifest.json (created if missing)",
    )
    parser.add_argument(
        "--alpha",
        type=_alpha,
        default=0.2,
        help=f"diffusion number dt*k/h^2, in (0, {MAX_ALPHA}] (default: %(default)s)",
    )
    return parser.parse_args(argv)


def _fail_rank() -> int | None:
    raw = os.environ.get(FAIL_RANK_ENV, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise CollectiveError(f"{FAIL_RANK_ENV}={raw!r} is not a rank number") from None


# --------------------------------------------------------------------------- checks


def _max_fitting_ranks(ny: int, nx: int, size: int) -> int:
    from mpi4py import MPI

    for n in range(size, 0, -1):
        py, px = MPI.Compute_dims(n, 2)
        if py <= ny and px <= nx:
            return n
    return 1


def _check_input(path: Path, ny: int, nx: int) -> str | None:
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
    if arr.shape != (ny, nx):
        return f"--in {path} has shape {arr.shape}, expected (ny, nx) = ({ny}, {nx})"
    # Any byte order is fine: conversion to native float64 is exact.
    if arr.dtype.kind != "f" or arr.dtype.itemsize != 8:
        return f"--in {path} has dtype {arr.dtype}, expected float64"
    return None


def _prepare_out(out_dir: Path) -> str | None:
    if out_dir.exists() and not out_dir.is_dir():
        return f"--out {out_dir} exists and is not a directory"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out_dir}: cannot create output directory ({exc.strerror or exc})"
    if not os.access(out_dir, os.W_OK | os.X_OK):
        return f"--out {out_dir}: output directory is not writable"
    return None


# --------------------------------------------------------------------------- parallel kernel


class _Block:
    """This rank's share of the grid, its neighbours, and the buffers for halo exchange.

    Buffers are allocated once: the step loop should only move data, not allocate.
    """

    def __init__(self, cart: MPI.Cartcomm, ny: int, nx: int) -> None:
        self.cart = cart
        self.dims: list[int] = list(cart.Get_topo()[0])
        self.coords: list[int] = list(cart.Get_coords(cart.Get_rank()))
        self.y0, self.y1 = block_range(ny, self.dims[0], self.coords[0])
        self.x0, self.x1 = block_range(nx, self.dims[1], self.coords[1])
        self.north, self.south = cart.Shift(0, 1)
        self.west, self.east = cart.Shift(1, 1)
        rows = self.y1 - self.y0
        self.send_w = np.zeros(rows)
        self.send_e = np.zeros(rows)
        self.recv_w = np.zeros(rows)
        self.recv_e = np.zeros(rows)

    def load(self, path: Path) -> np.ndarray:
        """Read only this rank's block (mmap + slice), into an array with a zero ghost ring."""
        src = np.load(path, mmap_mode="r", allow_pickle=False)
        u = np.zeros((self.y1 - self.y0 + 2, self.x1 - self.x0 + 2))
        u[1:-1, 1:-1] = src[self.y0 : self.y1, self.x0 : self.x1]
        del src
        return u

    def exchange(self, u: np.ndarray) -> None:
        """Fill `u`'s ghost ring from the neighbours' edges.

        Rows of a C-ordered array are contiguous, so they are sent and received in place;
        columns are staged through contiguous buffers. Sides facing the domain boundary
        (PROC_NULL) are no-ops, so those ghosts keep their zero Dirichlet value.
        """
        from mpi4py import MPI

        null = MPI.PROC_NULL
        if self.west != null:
            np.copyto(self.send_w, u[1:-1, 1])
        if self.east != null:
            np.copyto(self.send_e, u[1:-1, -2])
        dbl = MPI.DOUBLE
        cart = self.cart
        requests = [
            cart.Irecv([u[0, 1:-1], dbl], source=self.north, tag=_SOUTHWARD),
            cart.Irecv([u[-1, 1:-1], dbl], source=self.south, tag=_NORTHWARD),
            cart.Irecv([self.recv_w, dbl], source=self.west, tag=_EASTWARD),
            cart.Irecv([self.recv_e, dbl], source=self.east, tag=_WESTWARD),
            cart.Isend([u[1, 1:-1], dbl], dest=self.north, tag=_NORTHWARD),
            cart.Isend([u[-2, 1:-1], dbl], dest=self.south, tag=_SOUTHWARD),
            cart.Isend([self.send_w, dbl], dest=self.west, tag=_WESTWARD),
            cart.Isend([self.send_e, dbl], dest=self.east, tag=_EASTWARD),
        ]
        MPI.Request.Waitall(requests)
        if self.west != null:
            u[1:-1, 0] = self.recv_w
        if self.east != null:
            u[1:-1, -1] = self.recv_e

    def gather(self, u: np.ndarray, ny: int, nx: int) -> np.ndarray | None:
        """Assemble the global field on rank 0 (None elsewhere).

        Blocks arrive as flat runs in rank order; each is placed by its rank's Cartesian
        coordinates, which is what keeps the layout right for any process grid.
        """
        from mpi4py import MPI

        cart = self.cart
        local = np.ascontiguousarray(u[1:-1, 1:-1]).ravel()
        if cart.Get_rank() != 0:
            cart.Gatherv([local, MPI.DOUBLE], None, root=0)
            return None
        extents = []
        for r in range(cart.Get_size()):
            cy, cx = cart.Get_coords(r)
            extents.append((block_range(ny, self.dims[0], cy), block_range(nx, self.dims[1], cx)))
        counts = [(y1 - y0) * (x1 - x0) for (y0, y1), (x0, x1) in extents]
        displs = [sum(counts[:r]) for r in range(len(counts))]
        flat = np.empty(ny * nx)
        cart.Gatherv([local, MPI.DOUBLE], [flat, counts, displs, MPI.DOUBLE], root=0)
        field = np.empty((ny, nx))
        for ((y0, y1), (x0, x1)), start, count in zip(extents, displs, counts, strict=True):
            field[y0:y1, x0:x1] = flat[start : start + count].reshape(y1 - y0, x1 - x0)
        return field


def _run(argv: list[str] | None, comm: MPI.Intracomm) -> int:
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    args = _parse_args(argv, quiet=rank != 0)
    t_start = time.perf_counter()
    nx, ny, steps, alpha = args.nx, args.ny, args.steps, args.alpha
    fail_rank = _fail_rank()

    dims = MPI.Compute_dims(size, 2)
    if dims[0] > ny or dims[1] > nx:
        raise CollectiveError(
            f"grid (ny, nx) = ({ny}, {nx}) is too small for {size} ranks: the process grid "
            f"is {dims[0]} x {dims[1]} and each rank needs at least one cell per axis; "
            f"use at most {_max_fitting_ranks(ny, nx, size)} ranks or a larger grid"
        )

    # Rank 0 alone touches the filesystem for validation and broadcasts its verdict, so every
    # rank takes the same branch and the user sees a single message.
    problem = None
    if rank == 0:
        problem = _check_input(args.input, ny, nx) or _prepare_out(args.out)
    problem = comm.bcast(problem, root=0)
    if problem is not None:
        raise CollectiveError(problem)

    cart = comm.Create_cart(dims, periods=[False, False], reorder=False)
    block = _Block(cart, ny, nx)
    u = block.load(args.input)
    new = np.zeros_like(u)  # ghost ring stays 0 where a side faces the boundary
    scratch = np.empty((u.shape[0] - 2, u.shape[1] - 2))

    t_compute = time.perf_counter()
    for step in range(steps):
        block.exchange(u)
        stencil_step(u, new, alpha, scratch)
        u, new = new, u
        if step == 0 and rank == fail_rank:
            raise RuntimeError(f"injected failure ({FAIL_RANK_ENV})")
    compute_seconds = time.perf_counter() - t_compute

    field = block.gather(u, ny, nx)
    rank_seconds = cart.gather(compute_seconds, root=0)
    if rank == 0:
        assert field is not None
        field_path = atomic_save_npy(args.out / "field.npy", field)
        write_manifest(
            args.out,
            [field_path],
            kernel="heat",
            parameters={"nx": nx, "ny": ny, "steps": steps, "alpha": alpha},
            ranks=size,
            dims=list(dims),
            wall_seconds=time.perf_counter() - t_start,
            rank_seconds=rank_seconds,
        )
    # Nobody reports success before the outputs exist; if rank 0 fails writing, its Abort
    # reaches ranks still waiting here.
    cart.Barrier()
    cart.Free()
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        print(f"{PROG}: cannot import mpi4py ({exc})", file=sys.stderr)
        return 1

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        return _run(argv, comm)
    except CollectiveError as exc:
        if rank == 0:
            print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        print(f"{PROG}: rank {rank}: {_one_line(exc)}", file=sys.stderr, flush=True)
        if size > 1:
            comm.Abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
