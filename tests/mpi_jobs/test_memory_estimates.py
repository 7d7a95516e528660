"""The catalog's memory estimates bound what real ranks use, without being far above it.

Each kernel runs on 2 real mpiexec ranks; every rank reports its own peak RSS at exit (an
``atexit`` hook around ``python -m mpi_jobs.<kernel>``), and their sum is compared with the
estimate the spec check uses to refuse a run.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_jobs.catalog import KERNELS
from tests.kernel_launch import _env, mpiexec_cmd

_WRAP = ("import atexit, resource, runpy, sys; "
         "atexit.register(lambda: print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF)"
         ".ru_maxrss * 1024, file=sys.stderr, flush=True)); "
         "sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize(("kernel", "parameters"), [
    ("heat", {"nx": 3000, "ny": 2000, "steps": 2}),
    ("var", {"paths": 1 << 22, "confidence": 0.9}),
    ("kmer", {"k": 31, "reads": 40_000, "top": 0, "genome_length": 200_000}),
])
def test_estimate_bounds_the_ranks_peak_memory(tmp_path: Path, kernel, parameters):
    info = KERNELS[kernel]
    src = info.make_input(parameters, tmp_path / "input")
    argv = info.argv(parameters, src, tmp_path / "out")
    proc = subprocess.run([*mpiexec_cmd(2), sys.executable, "-c", _WRAP, info.module, *argv],
                          capture_output=True, text=True, timeout=300, env=_env(None))
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = [int(n) for n in re.findall(r"^PEAK_RSS (\d+)$", proc.stderr, re.MULTILINE)]
    assert len(peaks) == 2
    estimate = info.memory_estimate(parameters, 2)
    print(f"{kernel}: ranks peak {[p >> 20 for p in peaks]} MiB, estimate {estimate >> 20} MiB")
    assert sum(peaks) <= estimate <= 3 * sum(peaks), (peaks, estimate)
