"""The bundled kernels' parameter models with the example sizes as defaults.

Shared by the single-``kernel:`` spec and ``uses:`` steps, so both refuse the same values.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from mpi_jobs.catalog import HeatParameters, KmerParameters, VarParameters


class HeatDefaults(HeatParameters):
    """The catalog's heat parameters with the bundled example's sizes as defaults."""

    nx: int = Field(256, gt=0, le=65536, strict=True)
    ny: int = Field(256, gt=0, le=65536, strict=True)
    steps: int = Field(200, ge=0, strict=True)


class VarDefaults(VarParameters):
    paths: int = Field(1 << 20, gt=0, strict=True)


class KmerDefaults(KmerParameters):
    k: int = Field(21, ge=1, le=31, strict=True)


KERNEL_DEFAULTS: dict[str, type[BaseModel]] = {
    "heat": HeatDefaults, "var": VarDefaults, "kmer": KmerDefaults}
