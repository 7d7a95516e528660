"""Monte Carlo estimate of pi with mpi4py: the same answer for any number of ranks.

Samples are drawn in fixed blocks, each from its own ``SeedSequence`` child, and blocks are
dealt to ranks round-robin, so the set of samples does not depend on the rank count; the
integer hit counts are summed exactly with ``Allreduce``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from mpi4py import MPI

BLOCK = 100_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--samples", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    blocks = -(-args.samples // BLOCK)
    children = np.random.SeedSequence(args.seed).spawn(blocks)
    hits = np.zeros(1, dtype=np.int64)
    for b in range(comm.rank, blocks, comm.size):
        n = min(BLOCK, args.samples - b * BLOCK)
        xy = np.random.default_rng(children[b]).random((n, 2))
        hits[0] += int(np.count_nonzero((xy * xy).sum(axis=1) <= 1.0))
    total = np.zeros(1, dtype=np.int64)
    comm.Allreduce(hits, total, op=MPI.SUM)
    if comm.rank == 0:
        pi = 4.0 * int(total[0]) / args.samples
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"pi": pi, "hits": int(total[0]),
                                        "samples": args.samples, "seed": args.seed,
                                        "ranks": comm.size}) + "\n")
        print(f"pi ~ {pi:.6f} from {args.samples} samples on {comm.size} ranks")


if __name__ == "__main__":
    main()
