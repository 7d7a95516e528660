"""A run that cannot fit where it is sent is refused up front, with the numbers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.errors import SpecError
from flows.resource_checks import (
    LocalOptions,
    Machine,
    available_memory,
    check_resources,
    scratch_dir_problem,
    usable_cores,
)
from mpi_jobs.catalog import RANK_OVERHEAD

GiB = 1 << 30
LAPTOP = Machine(cores=2, available_bytes=8 * GiB)
SMALL_HEAT = {"nx": 64, "ny": 64, "steps": 1}


def test_default_allows_two_ranks_per_core():
    check_resources("heat", SMALL_HEAT, 4, "local", machine=LAPTOP)
    with pytest.raises(SpecError) as e:
        check_resources("heat", SMALL_HEAT, 5, "local", machine=LAPTOP, where="spec.yaml")
    msg = str(e.value)
    assert msg.startswith("spec.yaml: ranks: 5 ranks")
    assert "2 cores" in msg and "2.5x" in msg and "4 ranks" in msg
    assert "oversubscribe: 3" in msg  # what to write to allow it
    assert "\n" not in msg


@pytest.mark.parametrize(("oversubscribe", "allowed", "refused"),
                         [(False, 2, 3), (1.0, 2, 3), (8, 16, 17), (True, 32, None)])
def test_oversubscription_is_an_explicit_choice(oversubscribe, allowed, refused):
    local = LocalOptions(oversubscribe=oversubscribe)
    check_resources("heat", SMALL_HEAT, allowed, "local", local=local, machine=LAPTOP)
    if refused is not None:
        with pytest.raises(SpecError, match=f"ranks: {refused} ranks"):
            check_resources("heat", SMALL_HEAT, refused, "local", local=local, machine=LAPTOP)


@pytest.mark.parametrize("value", [0.5, 0, "yes", None])
def test_oversubscribe_takes_a_factor_of_at_least_one_or_a_boolean(value):
    with pytest.raises(ValueError, match="oversubscribe"):
        LocalOptions(oversubscribe=value)


@pytest.mark.parametrize(("kernel", "parameters", "shown"), [
    ("heat", {"nx": 65536, "ny": 65536, "nz": 4096, "steps": 1, "alpha": 0.1},
     "nx=65536, ny=65536, nz=4096"),
    ("var", {"paths": 1 << 40, "block_paths": 1 << 30}, "paths=1099511627776"),
    ("kmer", {"k": 31, "reads": 10**10, "read_length": 150, "top": 0}, "reads=10000000000"),
])
def test_a_job_that_cannot_fit_in_memory_is_refused_with_the_numbers(kernel, parameters, shown):
    with pytest.raises(SpecError) as e:
        check_resources(kernel, parameters, 2, "local", machine=LAPTOP)
    msg = str(e.value)
    assert msg.startswith(f"kernel.parameters: {kernel} on 2 ranks needs about ")
    assert "TiB" in msg or "PiB" in msg
    assert "8.0 GiB available" in msg and shown in msg


def test_memory_limits_only_the_local_backend():
    huge = {"nx": 65536, "ny": 65536, "nz": 4096, "steps": 1, "alpha": 0.1}
    for backend in ("slurm", "parallelcluster", "batch"):
        check_resources("heat", huge, 4096, backend, machine=LAPTOP)


def test_estimates_grow_with_the_problem_and_count_every_rank():
    from mpi_jobs.catalog import KERNELS

    heat = KERNELS["heat"]
    small = heat.memory_estimate({"nx": 512, "ny": 512, "steps": 1}, 2)
    big = heat.memory_estimate({"nx": 4096, "ny": 4096, "steps": 1}, 2)
    # two 128 MiB fields per rank set plus rank 0's gather (2 x 128 MiB) at least
    assert big - small >= 4 * 4096 * 4096 * 8 - 4 * 512 * 512 * 8
    assert heat.memory_estimate(SMALL_HEAT, 8) >= 8 * RANK_OVERHEAD
    kmer = KERNELS["kmer"]
    assert kmer.memory_estimate({"k": 31, "reads": 10**7}, 2) > kmer.memory_estimate(
        {"k": 31, "reads": 10**5}, 2)
    # Every k-mer occurrence is kept as a super-k-mer record until the input is read
    # (mpi_jobs/kmer_store.py), so memory grows with the reads at any k. What k=8 bounds is
    # the full dump's share: at most 4**8/2 canonical k-mers however many reads there are.
    def est(reads: int, top: int) -> int:
        return kmer.memory_estimate({"k": 8, "reads": reads, "top": top}, 2)

    assert est(10**7, 1000) > est(10**6, 1000)
    assert est(10**6, 0) - est(10**6, 1000) == est(10**7, 0) - est(10**7, 1000) > 0
    var = KERNELS["var"]
    assert var.memory_estimate({"paths": 10**9, "confidence": 0.99}, 2) > var.memory_estimate(
        {"paths": 10**9, "confidence": 0.9999}, 2)


def test_this_machine_is_measured():
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    assert 0 < available_memory()


@pytest.mark.parametrize("path", ["/", "/usr", "/etc", "/etc/clusterflow", "/proc/self",
                                  "/tmp", "/var", "/home", "/root", "/sys/fs", "~", "/usr/../"])
def test_system_directories_are_refused_as_scratch(path):
    assert scratch_dir_problem(Path(path)) is not None


@pytest.mark.parametrize("path", [".clusterflow/scratch", "/tmp/clusterflow", "/fsx/clusterflow",
                                  "/mnt/lustre/runs", "~/scratch"])
def test_ordinary_directories_are_fine_as_scratch(path):
    assert scratch_dir_problem(Path(path)) is None
