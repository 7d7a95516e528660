"""Shared bits of the kernel benchmarks: launching kernels, timing, machine facts, results."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def mpiexec(ranks: int) -> list[str]:
    launcher = Path(sys.executable).parent / "mpiexec"
    cmd = [str(launcher)]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if ranks > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")
    return [*cmd, "-n", str(ranks)]


def run_kernel(module: str, ranks: int, args: list[str]) -> tuple[float, dict[str, Any]]:
    """Run ``mpi_jobs.<module>`` on `ranks` ranks; (launcher wall seconds, its manifest)."""
    out = Path(args[args.index("--out") + 1])
    cmd = [*mpiexec(ranks), sys.executable, "-m", f"mpi_jobs.{module}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads((out / "manifest.json").read_text())


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Fastest of `repeat` timings: on a shared machine the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import numba
    import numpy

    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "loadavg_at_start": load,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "hostname": platform.node(),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path
