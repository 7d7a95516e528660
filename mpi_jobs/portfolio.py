"""Portfolios for the Value-at-Risk kernel: the file format, its validation, the market model.

A portfolio file is JSON::

    {"name": "...", "currency": "USD", "horizon_days": 10, "trading_days_per_year": 252,
     "assets": [{"name": "US equity", "position": 30000000, "mu": 0.07, "sigma": 0.17}, ...],
     "correlation": [[1.0, 0.8, ...], ...]}

``position`` is the amount held (negative = short), ``mu`` and ``sigma`` the annualised drift
and volatility of the asset's log-return, ``correlation`` the correlation matrix of the
log-returns (symmetric, unit diagonal, positive definite). Over the horizon
``tau = horizon_days / trading_days_per_year`` asset i's log-return is
``(mu_i - sigma_i**2 / 2) * tau + sigma_i * sqrt(tau) * eps_i`` with ``eps = L z`` (``L`` the
Cholesky factor of the correlation), and the position's P&L is
``position_i * expm1(log-return_i)``. Under Student-t, ``eps`` is scaled by
``sqrt((df - 2) / W)``, ``W ~ chi2(df)``: heavier tails, same covariance.

`mpi_jobs/data/portfolio.json` is the bundled example (`DEFAULT_PORTFOLIO`).
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def default_portfolio_path() -> Path:
    """The bundled example portfolio (package data)."""
    return Path(str(resources.files("mpi_jobs") / "data" / "portfolio.json"))


DEFAULT_PORTFOLIO = default_portfolio_path()


class Asset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    position: float = Field(allow_inf_nan=False)
    mu: float = Field(allow_inf_nan=False, ge=-5, le=5)
    sigma: float = Field(allow_inf_nan=False, ge=0, le=5)


class Portfolio(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    currency: str = "USD"
    horizon_days: float = Field(default=10, gt=0, le=3650)
    trading_days_per_year: float = Field(default=252, gt=0, le=366)
    assets: list[Asset] = Field(min_length=1)
    correlation: list[list[float]]

    @model_validator(mode="after")
    def _correlation_is_a_correlation_matrix(self) -> Portfolio:
        n = len(self.assets)
        c = np.array(self.correlation, dtype=np.float64) if self.correlation else np.zeros((0,))
        if c.shape != (n, n):
            raise ValueError(f"correlation must be {n} x {n} (one row per asset), got shape "
                             f"{c.shape}")
        if not np.all(np.isfinite(c)):
            raise ValueError("correlation has NaN or infinite entries")
        if not np.array_equal(np.diag(c), np.ones(n)):
            raise ValueError("correlation must have 1.0 on its diagonal")
        if not np.array_equal(c, c.T):
            bad = np.argwhere(c != c.T)[0]
            raise ValueError(f"correlation is not symmetric: [{bad[0]}][{bad[1]}] = "
                             f"{c[bad[0], bad[1]]} but [{bad[1]}][{bad[0]}] = {c[bad[1], bad[0]]}")
        if np.any(np.abs(c) > 1):
            raise ValueError("correlation entries must be in [-1, 1]")
        try:
            np.linalg.cholesky(c)
        except np.linalg.LinAlgError:
            raise ValueError("correlation matrix is not positive definite") from None
        return self

    # ------------------------------------------------------------------ market model

    @property
    def tau(self) -> float:
        return self.horizon_days / self.trading_days_per_year

    def model_arrays(self) -> dict[str, np.ndarray]:
        """Arrays the loss kernel needs: Cholesky factor, per-asset drift, vol, positions."""
        tau = self.tau
        sigma = np.array([a.sigma for a in self.assets])
        mu = np.array([a.mu for a in self.assets])
        return {
            "chol": np.ascontiguousarray(np.linalg.cholesky(np.array(self.correlation))),
            "drift": (mu - 0.5 * sigma**2) * tau,
            "vol": sigma * math.sqrt(tau),
            "position": np.array([a.position for a in self.assets]),
        }

    @property
    def gross_exposure(self) -> float:
        return math.fsum(abs(a.position) for a in self.assets)

    @property
    def net_exposure(self) -> float:
        return math.fsum(a.position for a in self.assets)


class PortfolioError(ValueError):
    """The portfolio file is missing or invalid; the message names the file and the field."""


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "portfolio"
    return f"{where}: {err['msg']}"


def load_portfolio(path: Path | None) -> tuple[Portfolio, str]:
    """The validated portfolio and the sha256 of its bytes (`path` None: the bundled one)."""
    path = DEFAULT_PORTFOLIO if path is None else Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PortfolioError(f"--portfolio {path}: no such file") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise PortfolioError(f"--portfolio {path}: cannot read it ({reason})") from None
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PortfolioError(f"--portfolio {path} is not valid JSON ({exc})") from None
    try:
        portfolio = Portfolio.model_validate(raw)
    except ValidationError as exc:
        raise PortfolioError(f"--portfolio {path}: {_first_error(exc)}") from None
    return portfolio, hashlib.sha256(data).hexdigest()
