"""Monte Carlo losses of a portfolio, in fixed-size blocks of paths with their own streams.

Block ``b`` of a run with seed ``s`` draws from ``Generator(PCG64(SeedSequence(s,
spawn_key=(b,))))``, which is exactly the ``b``-th child of ``SeedSequence(s).spawn(...)``:
its numbers depend on ``(s, b)`` only, not on which rank computes the block or what else that
rank computed. So the multiset of all path losses, and everything derived from it, is
identical for any rank count; only ``--block-paths`` (part of the result's identity) matters.

Losses are computed by a compiled loop with a fixed operation order (no BLAS, whose blocking
and threading could change the last bits between processes).

Definitions (``P`` paths, losses sorted ascending ``L(1) <= ... <= L(P)``, level ``c``):
    VaR_c = L(m) with m = ceil(c * P)  (the empirical c-quantile; c taken as an exact decimal)
    ES_c  = mean of L(m), ..., L(P)    (the t = P - m + 1 largest losses, summed with fsum)
Both need only the t largest losses, which is what ranks keep and send ("a gathered tail").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import numpy as np

from mpi_jobs.jit import jit
from mpi_jobs.portfolio import Portfolio

DISTRIBUTIONS = ("normal", "t")


@jit
def _losses(z, w, dof_minus_2, chol, drift, vol, position, out):  # type: ignore[no-untyped-def]
    paths, n = z.shape
    student = w.shape[0] > 0
    for p in range(paths):
        s = math.sqrt(dof_minus_2 / w[p]) if student else 1.0
        pnl = 0.0
        for i in range(n):
            e = 0.0
            for k in range(i + 1):
                e += chol[i, k] * z[p, k]
            pnl += position[i] * math.expm1(drift[i] + vol[i] * (s * e))
        out[p] = -pnl


@dataclass(frozen=True)
class MonteCarlo:
    """One run's model: portfolio arrays, distribution, seed and block layout."""

    chol: np.ndarray
    drift: np.ndarray
    vol: np.ndarray
    position: np.ndarray
    distribution: str
    df: float
    seed: int
    paths: int
    block_paths: int

    @classmethod
    def build(
        cls,
        portfolio: Portfolio,
        *,
        distribution: str,
        df: float,
        seed: int,
        paths: int,
        block_paths: int,
    ) -> MonteCarlo:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if distribution == "t" and not df > 2:
            raise ValueError(f"Student-t needs df > 2 (finite variance), got {df}")
        if paths <= 0 or block_paths <= 0 or seed < 0:
            raise ValueError("paths and block_paths must be positive and seed >= 0")
        return cls(**portfolio.model_arrays(), distribution=distribution, df=df, seed=seed,
                   paths=paths, block_paths=block_paths)

    @property
    def blocks(self) -> int:
        return -(-self.paths // self.block_paths)

    def block_size(self, block: int) -> int:
        return min(self.block_paths, self.paths - block * self.block_paths)

    def block_losses(self, block: int) -> np.ndarray:
        """Losses of the paths of `block`; the same bits whoever computes it."""
        if not 0 <= block < self.blocks:
            raise IndexError(f"block {block} is out of range (0..{self.blocks - 1})")
        n_paths = self.block_size(block)
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(block,)))
        )
        z = rng.standard_normal((n_paths, self.chol.shape[0]))
        if self.distribution == "t":
            w = rng.chisquare(self.df, n_paths)
        else:
            w = np.empty(0)
        out = np.empty(n_paths)
        _losses(z, w, self.df - 2.0, self.chol, self.drift, self.vol, self.position, out)
        return out


def quantile_rank(confidence: str | float, paths: int) -> int:
    """m = ceil(c * P), with `confidence` read as an exact decimal (so 0.99 * 100 is 99)."""
    c = Fraction(Decimal(str(confidence)))
    if not 0 < c < 1:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    return max(1, math.ceil(c * paths))


def tail_size(confidence: str | float, paths: int) -> int:
    """How many of the largest losses VaR and ES need: t = P - m + 1."""
    return paths - quantile_rank(confidence, paths) + 1


def largest(values: np.ndarray, count: int) -> np.ndarray:
    """The `count` largest values (as a multiset; order unspecified)."""
    if values.size <= count:
        return values
    return np.partition(values, values.size - count)[values.size - count :]


def var_es(tail: np.ndarray, count: int) -> tuple[float, float]:
    """VaR and ES from the `count` largest losses (exactly `count` of them)."""
    if tail.size != count:
        raise ValueError(f"expected the {count} largest losses, got {tail.size}")
    return float(tail.min()), math.fsum(tail.tolist()) / count


def reference_var(mc: MonteCarlo, confidence: str | float) -> tuple[float, float]:
    """Serial VaR and ES: all losses, fully sorted. What the MPI kernel must equal exactly."""
    losses = np.sort(np.concatenate([mc.block_losses(b) for b in range(mc.blocks)]))
    m = quantile_rank(confidence, mc.paths)
    tail = losses[m - 1 :]
    return float(losses[m - 1]), math.fsum(tail.tolist()) / tail.size
