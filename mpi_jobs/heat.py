"""Heat diffusion (explicit stencil) in 2D or 3D on a Cartesian MPI process grid.

Run::

    mpiexec -n N python -m mpi_jobs.heat --nx NX --ny NY [--nz NZ] --steps S \\
        --in FILE --out DIR [--alpha A] [--bc-x periodic] [--checkpoint-dir D --restart]

`FILE` is a float64 ``.npy`` array of shape ``(ny, nx)`` (2D) or ``(nz, ny, nx)`` (3D). Each
axis has its own boundary: ``dirichlet`` (zero outside the domain; the default) or
``periodic``. Rank 0 writes ``DIR/field.npy`` and ``DIR/manifest.json``; the manifest also
carries the total heat every ``--diag-every`` steps.

The process grid comes from ``MPI_Dims_create`` and ``MPI_Cart_create`` (periodic along the
periodic axes). Each step starts a non-blocking halo exchange (one subarray datatype per face,
sent straight from the padded array: no packing copies), updates the block's interior while
the messages are in flight, waits, then updates the one-cell shell that needed the halo. The
update itself is a compiled numba loop (`mpi_jobs.stencil_numba`), one pass over memory.

The field is bitwise identical for any rank count: every cell is updated with the same
floating-point operations in the same order (see `mpi_jobs.stencil`) and halo values are exact
copies, so ``np.array_equal`` against `reference_solution` is a meaningful test. The total heat
is computed by exact fixed-point integer summation, so it too is identical for any rank count
(the module docstring of `mpi_jobs.stencil` says how and what it costs).

Checkpoints (``--checkpoint-dir``): every ``--checkpoint-every`` steps each rank writes its
block and rank 0 commits the set (`mpi_jobs.checkpoint`). Blocks are stored with their global
extents, so ``--restart`` works with any rank count: each rank reads the parts of the saved
blocks that overlap its new block.

Layout: this module is the CLI and the time loop; the block decomposition and halo exchange
live in `mpi_jobs.heat_grid`, the input checks, total heat and checkpoint fingerprint in
`mpi_jobs.heat_diagnostics`.

Failure model: see `mpi_jobs.runtime`. Environment:
    CLUSTERFLOW_HEAT_FAIL_RANK=R
        Rank R raises ``RuntimeError`` right after its first step, so tests and operators can
        check that one failing rank takes the whole job down promptly. No effect when
        ``--steps`` is 0 or R is not a rank.
    CLUSTERFLOW_STEP_DELAY_SECONDS=T
        Sleep T seconds after each step (to make a small run long enough to interrupt).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpi_jobs.heat_diagnostics import TotalHeat, check_input, fingerprint
from mpi_jobs.heat_grid import Block, max_fitting_ranks
from mpi_jobs.manifest import atomic_save_npy, write_manifest
from mpi_jobs.runtime import (
    CollectiveError,
    KernelParser,
    RankTimer,
    add_checkpoint_args,
    agree,
    check_checkpoint_args,
    fail_rank,
    non_negative_int,
    positive_int,
    prepare_out,
    rank0_check,
    run_kernel,
    step_delay,
)
from mpi_jobs.stencil import (
    BOUNDARIES,
    check_alpha,
    reference_solution,
    reference_total_heat,
    stencil_step,
    total_heat_scale,
)

if TYPE_CHECKING:
    from mpi4py import MPI

__all__ = ["main", "reference_solution", "reference_total_heat", "stencil_step"]

PROG = "heat"
FAIL_RANK_ENV = "CLUSTERFLOW_HEAT_FAIL_RANK"
MAX_ALPHA = 0.25  # Von Neumann stability limit of the explicit 2D scheme (3D: 1/6).


# --------------------------------------------------------------------------- CLI


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    try:
        check_alpha(value, 2)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _parse_args(argv: list[str] | None, *, quiet: bool) -> argparse.Namespace:
    parser = KernelParser(
        kernel=PROG,
        quiet=quiet,
        description="Heat diffusion (explicit 5-point stencil in 2D, 7-point in 3D) on an MPI "
        "Cartesian process grid, with per-axis Dirichlet (zero) or periodic boundaries. "
        "Launch with mpiexec.",
        epilog=f"Set {FAIL_RANK_ENV}=R to make rank R fail after the first step (testing).",
    )
    parser.add_argument("--nx", type=positive_int, required=True, help="grid columns")
    parser.add_argument("--ny", type=positive_int, required=True, help="grid rows")
    parser.add_argument("--nz", type=positive_int, help="grid planes (makes the run 3D)")
    parser.add_argument("--steps", type=non_negative_int, required=True, help="time steps")
    parser.add_argument(
        "--in",
        dest="input",
        type=Path,
        required=True,
        metavar="FILE",
        help="initial field: float64 .npy of shape (ny, nx), or (nz, ny, nx) with --nz",
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
        help=f"diffusion number dt*k/h^2, in (0, {MAX_ALPHA}] in 2D and (0, 1/6] in 3D "
        "(default: %(default)s)",
    )
    for axis in ("x", "y", "z"):
        parser.add_argument(
            f"--bc-{axis}",
            choices=BOUNDARIES,
            default="dirichlet",
            help=f"boundary along {axis} (default: %(default)s)",
        )
    parser.add_argument(
        "--diag-every",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="record the total heat every N steps, 0 to switch it off (default: %(default)s)",
    )
    add_checkpoint_args(parser, unit="steps", default_every=100)
    args = parser.parse_args(argv)
    check_checkpoint_args(parser, args)
    if args.nz is None and args.bc_z != "dirichlet":
        parser.error("--bc-z needs --nz (a 2D run has no z axis)")
    if args.nz is not None:
        try:
            check_alpha(args.alpha, 3)
        except ValueError as exc:
            parser.error(f"argument --alpha: {exc}")
    return args


# --------------------------------------------------------------------------- driver


def _run(argv: list[str] | None, comm: MPI.Intracomm) -> int:
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    args = _parse_args(argv, quiet=rank != 0)
    t_start = time.perf_counter()
    shape = (args.ny, args.nx) if args.nz is None else (args.nz, args.ny, args.nx)
    ndim = len(shape)
    names = ("y", "x") if ndim == 2 else ("z", "y", "x")
    bc = tuple(getattr(args, f"bc_{name}") for name in names)
    steps, alpha = args.steps, args.alpha
    failing = fail_rank(FAIL_RANK_ENV)
    delay = step_delay()

    dims = MPI.Compute_dims(size, ndim)
    if any(d > n for d, n in zip(dims, shape, strict=True)):
        raise CollectiveError(
            f"grid {tuple(zip(names, shape, strict=True))} is too small for {size} ranks: the "
            f"process grid is {' x '.join(map(str, dims))} and each rank needs at least one "
            f"cell per axis; use at most {max_fitting_ranks(shape, size)} ranks or a larger grid"
        )
    rank0_check(comm, lambda: check_input(args.input, shape) or prepare_out(args.out))

    from mpi_jobs.checkpoint import Checkpointer
    from mpi_jobs.stencil_numba import box_array, update_boxes

    checkpointer = None
    if args.checkpoint_dir is not None:
        expected = fingerprint(args, shape, bc) if rank == 0 else {}
        checkpointer = Checkpointer(comm, args.checkpoint_dir, PROG, comm.bcast(expected))
        rank0_check(comm, checkpointer.prepare_root)

    cart = comm.Create_cart(dims, periods=[b == "periodic" for b in bc], reorder=False)
    block = Block(cart, shape)
    u = block.load(args.input)
    inner = (slice(1, -1),) * ndim
    finite = bool(np.isfinite(u[inner]).all())
    agree(cart, None if finite else f"--in {args.input} contains NaN or infinite values")
    max_abs = cart.allreduce(float(np.max(np.abs(u[inner]))), op=MPI.MAX)
    heat = TotalHeat(cart, total_heat_scale(math.prod(shape), max_abs), args.diag_every)

    first = 0
    if checkpointer is not None and args.restart:
        ckpt = checkpointer.latest(max_step=steps)
        if ckpt is not None:
            block.load_checkpoint(ckpt, u)
            first = ckpt.step
            if rank == 0:
                heat.steps = [int(s) for s in ckpt.load("diag_steps.npy").tolist()]
                heat.values = [float(v) for v in ckpt.load("diag_values.npy").tolist()]
                print(f"{PROG}: restarting from step {first} ({ckpt.directory})", flush=True)
        elif rank == 0:
            print(f"{PROG}: no complete checkpoint in {args.checkpoint_dir}; starting at step 0",
                  flush=True)
    if first == 0 and heat.due(0):
        from mpi_jobs.stencil import fixed_point_parts

        heat.record(0, *fixed_point_parts(u[inner], heat.scale), 0)

    new = np.zeros_like(u)  # ghost layer stays 0 where a side faces a Dirichlet boundary
    exchange = {id(u): block.exchange_requests(u), id(new): block.exchange_requests(new)}
    interior = box_array([block.interior_box()], ndim)
    shell = box_array(block.shell_boxes(), ndim)
    timer = RankTimer()
    for step in range(first + 1, steps + 1):
        with timer:
            scale = heat.scale_factor if heat.due(step) else None
            requests = exchange[id(u)]
            MPI.Prequest.Startall(requests)
            high, low, bad = update_boxes(u, new, alpha, interior, scale)
            MPI.Request.Waitall(requests)
            h, lo, b = update_boxes(u, new, alpha, shell, scale)
            u, new = new, u
            if scale is not None:
                heat.record(step, high + h, low + lo, bad | b)
        if step == 1 and rank == failing:
            raise RuntimeError(f"injected failure ({FAIL_RANK_ENV})")
        if delay:
            time.sleep(delay)
        if checkpointer is not None and step % args.checkpoint_every == 0 and step < steps:
            heat.reduce()
            piece = f"piece-{rank:06d}.npy"
            extents = cart.gather({piece: {"lo": block.lo, "hi": block.hi}}, root=0)
            pieces = {k: v for part in extents or [] for k, v in part.items()}
            arrays = {piece: u[inner]}
            if rank == 0:
                arrays["diag_steps.npy"] = np.array(heat.steps, dtype=np.int64)
                arrays["diag_values.npy"] = np.array(heat.values, dtype=np.float64)
            checkpointer.save(step, arrays, {"pieces": pieces})

    heat.reduce()
    field = block.gather(u)
    rank_seconds = cart.gather(timer.seconds, root=0)
    if rank == 0:
        assert field is not None and rank_seconds is not None
        slowest = max(rank_seconds)
        field_path = atomic_save_npy(args.out / "field.npy", field)
        parameters: dict[str, Any] = {"nx": args.nx, "ny": args.ny, "steps": steps, "alpha": alpha}
        if args.nz is not None:
            parameters["nz"] = args.nz
        write_manifest(
            args.out,
            [field_path],
            kernel=PROG,
            parameters=parameters,
            boundaries=dict(zip(names, bc, strict=True)),
            ranks=size,
            dims=list(dims),
            wall_seconds=time.perf_counter() - t_start,
            rank_seconds=rank_seconds,
            cell_updates_per_second=(
                math.prod(shape) * (steps - first) / slowest if slowest else None
            ),
            total_heat={
                "every": args.diag_every,
                "method": "fixed-point integer sum at scale 2**S (rank-count independent)",
                "scale_exponent": heat.scale,
                "steps": heat.steps,
                "values": heat.values,
            },
            restarted_from_step=first if args.restart else None,
            checkpoints_written=checkpointer.saved if checkpointer else 0,
        )
    # Nobody reports success before the outputs exist; if rank 0 fails writing, its Abort
    # reaches ranks still waiting here.
    cart.Barrier()
    block.free()
    cart.Free()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_kernel(PROG, lambda comm: _run(argv, comm))


if __name__ == "__main__":
    raise SystemExit(main())
