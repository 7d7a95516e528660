"""The pipeline-facing kernel catalog: its argv is what each kernel's own parser accepts, its
generated inputs are valid inputs, and bad parameters are refused naming the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from mpi_jobs import heat, kmer, var
from mpi_jobs.catalog import KERNELS
from mpi_jobs.fastx import FASTQ, detect_format, is_gzip
from mpi_jobs.portfolio import load_portfolio

PARSERS = {"heat": heat._parse_args, "var": var._parse_args, "kmer": kmer._parse_args}
PARAMS = {
    "heat": {"nx": 9, "ny": 7, "nz": 3, "steps": 4, "alpha": 0.1, "bc_z": "periodic"},
    "var": {"paths": 1000, "dist": "t", "df": 4.5, "confidence": 0.975},
    "kmer": {"k": 21, "top": 0, "genome_length": 3000, "reads": 20, "read_length": 50},
}


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_argv_is_accepted_by_the_kernel(name: str, tmp_path: Path) -> None:
    info = KERNELS[name]
    argv = info.argv(PARAMS[name], tmp_path / "in", tmp_path / "out",
                     checkpoint_dir=tmp_path / "ck", checkpoint_every=3, restart=True)
    args = PARSERS[name](argv, quiet=False)
    assert args.out == tmp_path / "out" and args.restart and args.checkpoint_every == 3
    assert info.module == f"mpi_jobs.{name}" and info.main_result in info.outputs


def test_generated_inputs_are_valid(tmp_path: Path) -> None:
    p = KERNELS["heat"].validate(PARAMS["heat"])
    field = np.load(KERNELS["heat"].make_input(p, tmp_path / KERNELS["heat"].input_key(p)))
    assert field.shape == (3, 7, 9) and field.dtype == np.float64
    assert KERNELS["heat"].input_key({"nx": 45, "ny": 31, "steps": 1}) == "heat-31x45.npy"
    portfolio, _ = load_portfolio(KERNELS["var"].make_input(PARAMS["var"], tmp_path / "p.json"))
    assert len(portfolio.assets) == 8
    reads = KERNELS["kmer"].make_input(PARAMS["kmer"], tmp_path / "reads")
    assert is_gzip(reads) and detect_format(reads) == FASTQ
    assert KERNELS["kmer"].input_key(PARAMS["kmer"]).endswith(".fastq.gz")


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [("heat", {"nx": 4, "ny": 4, "nz": 4, "steps": 1, "alpha": 0.2}, "alpha"),
     ("heat", {"nx": 4, "ny": 4, "steps": 1, "bc_z": "periodic"}, "bc_z"),
     ("var", {"paths": 10, "confidence": 1.0}, "confidence"),
     ("kmer", {"k": 32}, "k"),
     ("kmer", {"k": 5, "colour": "x"}, "colour")],
)
def test_bad_parameters_name_the_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        KERNELS[name].validate(params)
