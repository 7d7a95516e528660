"""Monte Carlo Value-at-Risk and Expected Shortfall of a portfolio, on MPI ranks.

Run::

    mpiexec -n N python -m mpi_jobs.var --paths P [--seed S] [--confidence C] \\
        [--portfolio FILE] [--dist normal|t --df NU] --out DIR

Writes ``DIR/result.json`` (``var``, ``es`` and what they were computed from) and
``DIR/manifest.json``. Without ``--portfolio`` the bundled example portfolio is used
(`mpi_jobs/data/portfolio.json`; the format is described in `mpi_jobs.portfolio`).

Rank-count independence: paths come in fixed-size blocks (``--block-paths``), each with its
own random stream spawned from the seed *per block*, never per rank (`mpi_jobs.montecarlo`),
so the set of simulated losses is the same for any rank count. The quantile is exact, not
estimated from per-rank quantiles: VaR and ES need only the ``t = P - ceil(c P) + 1`` largest
losses, so each rank keeps its own ``t`` largest, rank 0 gathers those tails and selects the
``t`` largest overall (a superset of the global tail), and ES is their ``math.fsum`` (exact,
order-free). Results are therefore bitwise identical for any rank count.

Blocks are processed in rounds. Without checkpoints there is one round: each rank takes a
contiguous share of the blocks. With ``--checkpoint-dir`` a round is ``--checkpoint-every``
blocks per rank; after each round the tails are merged on rank 0, which checkpoints the merged
tail and the number of blocks done. That state does not depend on the rank count, so
``--restart`` works with any number of ranks.

Environment: ``CLUSTERFLOW_VAR_FAIL_RANK=R`` makes rank R fail after its first block;
``CLUSTERFLOW_STEP_DELAY_SECONDS=T`` sleeps T seconds after each block (testing aids).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpi_jobs.manifest import atomic_write_text, write_manifest
from mpi_jobs.runtime import (
    CollectiveError,
    KernelParser,
    RankTimer,
    add_checkpoint_args,
    check_checkpoint_args,
    fail_rank,
    non_negative_int,
    positive_int,
    prepare_out,
    run_kernel,
    step_delay,
)

if TYPE_CHECKING:
    from mpi4py import MPI

PROG = "var"
FAIL_RANK_ENV = "CLUSTERFLOW_VAR_FAIL_RANK"
DEFAULT_BLOCK_PATHS = 1 << 16


def _confidence(text: str) -> str:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value.is_finite() and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return text


def _df(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 2):
        raise argparse.ArgumentTypeError(
            f"must be > 2 so the Student-t returns have a finite variance, got {text}"
        )
    return value


def _parse_args(argv: list[str] | None, *, quiet: bool) -> argparse.Namespace:
    parser = KernelParser(
        kernel=PROG,
        quiet=quiet,
        description="Monte Carlo Value-at-Risk and Expected Shortfall of a portfolio under "
        "correlated normal or Student-t log-returns. Launch with mpiexec.",
        epilog=f"Set {FAIL_RANK_ENV}=R to make rank R fail after its first block (testing).",
    )
    parser.add_argument("--paths", type=positive_int, required=True, help="Monte Carlo paths")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="root seed (default: %(default)s)")
    parser.add_argument("--confidence", type=_confidence, default="0.99",
                        help="VaR/ES level c in (0, 1) (default: %(default)s)")
    parser.add_argument("--portfolio", type=Path, metavar="FILE",
                        help="portfolio JSON (default: the bundled example portfolio)")
    parser.add_argument("--dist", choices=("normal", "t"), default="normal",
                        help="return distribution (default: %(default)s)")
    parser.add_argument("--df", type=_df, default=5.0,
                        help="Student-t degrees of freedom, > 2 (default: %(default)s)")
    parser.add_argument("--block-paths", type=positive_int, default=DEFAULT_BLOCK_PATHS,
                        help="paths per random-stream block; results depend on it, never on "
                        "the rank count (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output directory for result.json and manifest.json")
    add_checkpoint_args(parser, unit="blocks per rank", default_every=16)
    args = parser.parse_args(argv)
    check_checkpoint_args(parser, args)
    return args


def _share(start: int, count: int, size: int, rank: int) -> range:
    """This rank's contiguous, balanced share of blocks [start, start + count)."""
    base, extra = divmod(count, size)
    lo = start + rank * base + min(rank, extra)
    return range(lo, lo + base + (1 if rank < extra else 0))


def _gather_tails(comm: MPI.Intracomm, local: np.ndarray) -> np.ndarray | None:
    from mpi4py import MPI

    local = np.ascontiguousarray(local, dtype=np.float64)
    counts = comm.gather(local.size, root=0)
    if comm.Get_rank() != 0:
        comm.Gatherv([local, MPI.DOUBLE], None, root=0)
        return None
    assert counts is not None
    displs = [sum(counts[:r]) for r in range(len(counts))]
    out = np.empty(sum(counts))
    comm.Gatherv([local, MPI.DOUBLE], [out, counts, displs, MPI.DOUBLE], root=0)
    return out


def _run(argv: list[str] | None, comm: MPI.Intracomm) -> int:
    rank, size = comm.Get_rank(), comm.Get_size()
    args = _parse_args(argv, quiet=rank != 0)
    t_start = time.perf_counter()
    failing = fail_rank(FAIL_RANK_ENV)
    delay = step_delay()

    from mpi_jobs.checkpoint import Checkpointer
    from mpi_jobs.montecarlo import MonteCarlo, largest, tail_size, var_es
    from mpi_jobs.portfolio import PortfolioError, load_portfolio

    # Rank 0 validates and builds the model (Cholesky included) and broadcasts it, so every
    # rank uses the very same bits.
    setup: Any = None
    if rank == 0:
        try:
            portfolio, digest = load_portfolio(args.portfolio)
            mc = MonteCarlo.build(portfolio, distribution=args.dist, df=args.df, seed=args.seed,
                                  paths=args.paths, block_paths=args.block_paths)
            problem = prepare_out(args.out)
            setup = problem if problem else (portfolio, digest, mc)
        except PortfolioError as exc:
            setup = str(exc)
    setup = comm.bcast(setup, root=0)
    if isinstance(setup, str):
        raise CollectiveError(setup)
    portfolio, digest, mc = setup
    tail_count = tail_size(args.confidence, args.paths)
    blocks = mc.blocks

    checkpointer = None
    if args.checkpoint_dir is not None:
        fingerprint = {
            "portfolio_sha256": digest,
            "paths": args.paths,
            "seed": args.seed,
            "confidence": args.confidence,
            "distribution": args.dist,
            "df": args.df if args.dist == "t" else None,
            "block_paths": args.block_paths,
        }
        checkpointer = Checkpointer(comm, args.checkpoint_dir, PROG, fingerprint)
        problem = checkpointer.prepare_root() if rank == 0 else None
        problem = comm.bcast(problem, root=0)
        if problem:
            raise CollectiveError(problem)

    done = 0
    tail = np.empty(0)  # rank 0: the largest losses of blocks [0, done)
    if checkpointer is not None and args.restart:
        ckpt = checkpointer.latest(max_step=blocks)
        if ckpt is not None:
            done = ckpt.step
            if rank == 0:
                tail = ckpt.load("tail.npy")
                print(f"{PROG}: restarting after block {done} of {blocks} ({ckpt.directory})",
                      flush=True)
        elif rank == 0:
            print(f"{PROG}: no complete checkpoint in {args.checkpoint_dir}; starting at "
                  "block 0", flush=True)

    restarted_from = done if args.restart else None
    simulated = args.paths - min(args.paths, done * args.block_paths)
    per_round = size * args.checkpoint_every if checkpointer is not None else blocks
    compact_at = max(2 * tail_count, 1 << 20)
    timer = RankTimer()
    first_block = True
    while done < blocks:
        span = min(per_round, blocks - done)
        pending: list[np.ndarray] = []
        held = 0
        local = np.empty(0)
        for block in _share(done, span, size, rank):
            with timer:
                pending.append(mc.block_losses(block))
                held += pending[-1].size
                if held >= compact_at:
                    local = largest(np.concatenate([local, *pending]), tail_count)
                    pending, held = [], 0
            if first_block and rank == failing:
                raise RuntimeError(f"injected failure ({FAIL_RANK_ENV})")
            first_block = False
            if delay:
                time.sleep(delay)
        with timer:
            local = largest(np.concatenate([local, *pending]), tail_count)
        gathered = _gather_tails(comm, local)
        if gathered is not None:
            tail = largest(np.concatenate([tail, gathered]), tail_count)
        done += span
        if checkpointer is not None and done < blocks:
            arrays = {"tail.npy": tail} if rank == 0 else {}
            checkpointer.save(done, arrays, {"blocks_done": done, "blocks": blocks})

    rank_seconds = comm.gather(timer.seconds, root=0)
    if rank == 0:
        var, es = var_es(tail, tail_count)
        result = {
            "var": var,
            "es": es,
            "confidence": float(args.confidence),
            "paths": args.paths,
            "tail_paths": tail_count,
            "currency": portfolio.currency,
            "horizon_days": portfolio.horizon_days,
            "distribution": args.dist,
            "df": args.df if args.dist == "t" else None,
            "seed": args.seed,
            "block_paths": args.block_paths,
            "portfolio": portfolio.name,
            "portfolio_sha256": digest,
            "gross_exposure": portfolio.gross_exposure,
            "net_exposure": portfolio.net_exposure,
            "definition": "loss = -sum(position * expm1(log-return)); var = L(m), "
            "m = ceil(confidence * paths) of the ascending losses; es = mean of L(m..paths)",
        }
        result_path = atomic_write_text(args.out / "result.json",
                                        json.dumps(result, indent=2, allow_nan=False) + "\n")
        assert rank_seconds is not None
        write_manifest(
            args.out,
            [result_path],
            kernel=PROG,
            parameters={
                "paths": args.paths,
                "seed": args.seed,
                "confidence": float(args.confidence),
                "distribution": args.dist,
                "df": args.df if args.dist == "t" else None,
                "block_paths": args.block_paths,
                "portfolio": str(args.portfolio) if args.portfolio else None,
            },
            ranks=size,
            blocks=blocks,
            wall_seconds=time.perf_counter() - t_start,
            rank_seconds=rank_seconds,
            paths_per_second=simulated / max(rank_seconds) if max(rank_seconds) else None,
            restarted_from_block=restarted_from,
            checkpoints_written=checkpointer.saved if checkpointer else 0,
            var=var,
            es=es,
        )
    comm.Barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_kernel(PROG, lambda comm: _run(argv, comm))


if __name__ == "__main__":
    raise SystemExit(main())
