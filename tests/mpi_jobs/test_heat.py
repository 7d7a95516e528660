"""The heat kernel: numerics in-process, and the MPI code through the real mpiexec."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mpi_jobs.heat import _parse_args, reference_solution, reference_total_heat
from mpi_jobs.stencil import (
    fill_periodic_ghosts,
    fixed_point_parts,
    normalise_parts,
    stencil_step,
    total_heat,
    total_heat_scale,
)
from mpi_jobs.stencil_numba import update_box
from tests.kernel_launch import (
    kernel_lines,
    kill_one_rank_once,
    newest_checkpoint_step,
    run,
    run_ok,
    start,
)

# --------------------------------------------------------------------------- serial reference


def _naive(u0: np.ndarray, steps: int, alpha: float, periodic: tuple[bool, ...]) -> np.ndarray:
    # Independent scalar transcription of the formula, any dimension, with explicit index
    # wrapping for periodic axes and zeros outside Dirichlet ones. Python floats are IEEE
    # doubles and the operation order is the kernel's, so results must match exactly.
    shape = u0.shape
    u = {idx: float(v) for idx, v in np.ndenumerate(u0)}

    def at(idx: tuple[int, ...]) -> float:
        fixed = []
        for axis, (i, n) in enumerate(zip(idx, shape, strict=True)):
            if 0 <= i < n:
                fixed.append(i)
            elif periodic[axis]:
                fixed.append(i % n)
            else:
                return 0.0
        return u[tuple(fixed)]

    for _ in range(steps):
        new = {}
        for idx in u:
            acc = None
            for axis in range(len(shape)):
                for d in (-1, 1):
                    nb = list(idx)
                    nb[axis] += d
                    acc = at(tuple(nb)) if acc is None else acc + at(tuple(nb))
            c = u[idx]
            new[idx] = c + alpha * (acc - float(2 * len(shape)) * c)
        u = new
    out = np.empty(shape)
    for idx, v in u.items():
        out[idx] = v
    return out


def test_reference_matches_scalar_formula_bitwise() -> None:
    u0 = np.random.default_rng(7).random((6, 5))
    assert np.array_equal(reference_solution(u0, 4, 0.2), _naive(u0, 4, 0.2, (False, False)))


def test_reference_3d_periodic_matches_scalar_formula_bitwise() -> None:
    u0 = np.random.default_rng(8).random((3, 4, 5)) - 0.5
    bc = ("periodic", "dirichlet", "periodic")
    got = reference_solution(u0, 3, 0.15, bc)
    assert np.array_equal(got, _naive(u0, 3, 0.15, (True, False, True)))


def test_reference_leaks_heat_through_zero_boundary_and_keeps_it_when_periodic() -> None:
    u0 = np.zeros((5, 5))
    u0[2, 2] = 1.0
    u1 = reference_solution(u0, 1, 0.25)
    assert u1[2, 2] == 0.0 and u1[1, 2] == u1[3, 2] == u1[2, 1] == u1[2, 3] == 0.25
    assert reference_solution(u0, 50, 0.25).sum() < 1.0
    _, totals = reference_total_heat(u0, 50, 0.25, ("periodic", "periodic"))
    assert totals[0] == 1.0 and abs(totals[-1] - 1.0) < 1e-14


def test_reference_rejects_unstable_alpha() -> None:
    with pytest.raises(ValueError, match="stable"):
        reference_solution(np.zeros((3, 3)), 1, 0.3)
    with pytest.raises(ValueError, match="stable"):
        reference_solution(np.zeros((3, 3, 3)), 1, 0.2)  # 3D limit is 1/6


# --------------------------------------------------------------------------- compiled kernels


@pytest.mark.parametrize("shape", [(13, 9), (5, 7, 6)])
def test_numba_update_equals_numpy_bitwise(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    u = np.zeros(tuple(n + 2 for n in shape))
    inner = (slice(1, -1),) * len(shape)
    u[inner] = rng.random(shape) * 100 - 30
    bc = ("periodic",) * len(shape)
    fill_periodic_ghosts(u, bc)
    alpha = 0.16
    expected = np.zeros_like(u)
    stencil_step(u, expected, alpha, np.empty(shape))
    got = np.zeros_like(u)
    scale = total_heat_scale(math.prod(shape), 100.0)
    whole = tuple((1, n + 1) for n in shape)
    high, low, bad = update_box(u, got, alpha, whole, math.ldexp(1.0, scale))
    assert np.array_equal(got, expected)
    assert bad == 0
    # The fused total equals the numpy fixed-point sum of the new field.
    assert normalise_parts(int(high), int(low)) == fixed_point_parts(expected[inner], scale)


def test_total_heat_is_order_free_and_close_to_fsum() -> None:
    rng = np.random.default_rng(5)
    field = rng.normal(50.0, 30.0, size=20_000) * np.exp(rng.normal(0, 3, size=20_000))
    scale = total_heat_scale(field.size, float(np.abs(field).max()))
    whole = fixed_point_parts(field, scale)
    # Any partition into blocks, summed in any order, gives the same integers.
    for trial in range(5):
        cuts = np.sort(rng.choice(field.size, size=7, replace=False))
        data = field[rng.permutation(field.size)] if trial else field
        parts = [fixed_point_parts(block, scale) for block in np.split(data, cuts)]
        high = sum(p[0] for p in parts)
        low = sum(p[1] for p in parts)
        assert normalise_parts(high, low) == whole
    exact = math.fsum(field.tolist())
    assert abs(total_heat(field, scale) - exact) <= 4 * math.ulp(exact)


# --------------------------------------------------------------------------- CLI parsing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alpha", "0.3"], "0.25"),
        (["--nz", "4", "--alpha", "0.2"], "0.166667"),
        (["--bc-z", "periodic"], "--bc-z needs --nz"),
        (["--restart"], "--restart needs --checkpoint-dir"),
        (["--bc-x", "open"], "invalid choice"),
        (["--nx", "0"], "must be a positive integer"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--nx", "4", "--ny", "4", "--steps", "1", "--in", "x.npy", "--out", "o"]
    with pytest.raises(SystemExit) as exc:
        _parse_args([*base, *argv], quiet=False)
    assert exc.value.code == 2
    (line,) = kernel_lines(capsys.readouterr().err, "heat")
    assert message in line, line


# --------------------------------------------------------------------------- MPI kernel


def _write_input(path: Path, shape: tuple[int, ...], seed: int) -> np.ndarray:
    u0 = np.random.default_rng(seed).random(shape) * 80 - 20
    np.save(path, u0)
    return u0


def _heat_args(shape: tuple[int, ...], steps: int, alpha: float, inp: Path, out: Path) -> list[str]:
    args = ["--ny", str(shape[-2]), "--nx", str(shape[-1]), "--steps", str(steps)]
    if len(shape) == 3:
        args += ["--nz", str(shape[0])]
    return [*args, "--alpha", str(alpha), "--in", str(inp), "--out", str(out)]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_matches_reference_bitwise(tmp_path: Path, ranks: int) -> None:
    shape, steps = (37, 23), 20
    u0 = _write_input(tmp_path / "u0.npy", shape, seed=12345)
    out = tmp_path / "out"
    env = {}
    if ranks == 2:
        # Ranks compiling into one empty numba cache at once must work (and fill it).
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    run_ok("heat", ranks, _heat_args(shape, steps, 0.2, tmp_path / "u0.npy", out),
           env_extra=env, timeout=120)

    field = np.load(out / "field.npy")
    assert field.dtype == np.float64 and field.shape == shape
    assert np.array_equal(field, reference_solution(u0, steps, 0.2))

    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["files"]
    assert entry["name"] == "field.npy"
    data = (out / "field.npy").read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["bytes"] == len(data)
    assert entry["shape"] == list(shape) and entry["dtype"] == "float64"
    assert manifest["kernel"] == "heat"
    assert manifest["parameters"] == {"nx": 23, "ny": 37, "steps": steps, "alpha": 0.2}
    assert manifest["ranks"] == ranks
    assert len(manifest["dims"]) == 2 and manifest["dims"][0] * manifest["dims"][1] == ranks
    assert len(manifest["rank_seconds"]) == ranks
    assert manifest["wall_seconds"] >= 0
    steps_out, totals = reference_total_heat(u0, steps, 0.2)
    assert manifest["total_heat"]["steps"] == steps_out == list(range(steps + 1))
    assert manifest["total_heat"]["values"] == totals
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left"
    if ranks == 2:
        assert list((tmp_path / "numba-cache").rglob("*.nbi")), "numba cache not written"


@pytest.mark.parametrize(
    ("ranks", "shape", "bc", "alpha"),
    [
        # 3 x 1 process grid: a ring along y; x is periodic over a single rank (self-exchange).
        (3, (17, 10), {"y": "periodic", "x": "periodic"}, 0.25),
        # 2 x 2 x 1: along z both neighbours are the same rank; x wraps onto the rank itself.
        (4, (7, 9, 11), {"z": "periodic", "y": "dirichlet", "x": "periodic"}, 0.15),
    ],
)
def test_periodic_and_3d_match_reference_bitwise(
    tmp_path: Path, ranks: int, shape: tuple[int, ...], bc: dict[str, str], alpha: float
) -> None:
    u0 = _write_input(tmp_path / "u0.npy", shape, seed=ranks)
    out = tmp_path / "out"
    flags = [f"--bc-{axis}={kind}" for axis, kind in bc.items()]
    args = [*_heat_args(shape, 9, alpha, tmp_path / "u0.npy", out), *flags, "--diag-every", "4"]
    run_ok("heat", ranks, args)
    axes = ("z", "y", "x")[-len(shape):]
    order = tuple(bc[a] for a in axes)
    assert np.array_equal(np.load(out / "field.npy"), reference_solution(u0, 9, alpha, order))
    manifest = json.loads((out / "manifest.json").read_text())
    steps_out, totals = reference_total_heat(u0, 9, alpha, order, every=4)
    assert manifest["total_heat"]["steps"] == steps_out == [0, 4, 8]
    assert manifest["total_heat"]["values"] == totals
    assert manifest["boundaries"] == dict(zip(axes, order, strict=True))


def test_killed_run_restarts_bitwise_with_another_rank_count(tmp_path: Path) -> None:
    shape, steps = (21, 16), 300
    u0 = _write_input(tmp_path / "u0.npy", shape, seed=4)
    ckpt = tmp_path / "ckpt"
    args = [*_heat_args(shape, steps, 0.2, tmp_path / "u0.npy", tmp_path / "out"),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "10"]
    # ~12 s between the awaited checkpoint and the natural end: room for a stalled test process.
    proc = start("heat", 3, args, env_extra={"CLUSTERFLOW_STEP_DELAY_SECONDS": "0.05"})
    kill_one_rank_once(proc, lambda: newest_checkpoint_step(ckpt, "heat") >= 60)
    assert not (tmp_path / "out" / "field.npy").exists()
    resumed_at = newest_checkpoint_step(ckpt, "heat")
    assert 60 <= resumed_at < steps

    result = run("heat", 2, [*args, "--restart"])
    assert result.returncode == 0, result.stderr
    assert f"restarting from step {resumed_at}" in result.stdout
    assert np.array_equal(np.load(tmp_path / "out" / "field.npy"),
                          reference_solution(u0, steps, 0.2))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["restarted_from_step"] == resumed_at
    assert manifest["total_heat"]["values"] == reference_total_heat(u0, steps, 0.2)[1]
    # At most the two newest complete checkpoints are kept.
    assert len(list(ckpt.glob("heat-*/COMPLETE.json"))) <= 2

    # The same checkpoints must not be continued with different physics.
    other = run("heat", 1, [*args, "--restart", "--alpha", "0.1"])
    assert other.returncode == 1
    (line,) = kernel_lines(other.stderr, "heat")
    assert "different run" in line and "alpha" in line, line


def test_failing_rank_aborts_the_job(tmp_path: Path) -> None:
    _write_input(tmp_path / "u0.npy", (64, 64), seed=1)
    out = tmp_path / "out"
    result = run(
        "heat",
        2,
        _heat_args((64, 64), 100_000, 0.2, tmp_path / "u0.npy", out),
        env_extra={"CLUSTERFLOW_HEAT_FAIL_RANK": "1"},
        timeout=60,
    )
    assert result.returncode != 0
    assert "heat: rank 1: RuntimeError: injected failure" in result.stderr, result.stderr
    assert not (out / "field.npy").exists()


def test_bad_input_shape_is_one_clear_line(tmp_path: Path) -> None:
    np.save(tmp_path / "u0.npy", np.zeros((10, 12)))
    args = ["--nx", "10", "--ny", "12", "--steps", "3", "--in", str(tmp_path / "u0.npy")]
    result = run("heat", 2, [*args, "--out", str(tmp_path / "out")], timeout=60)
    assert result.returncode != 0
    (line,) = kernel_lines(result.stderr, "heat")
    assert "has shape (10, 12)" in line and "(ny, nx) = (12, 10)" in line, line
    assert not (tmp_path / "out" / "field.npy").exists()


def test_non_finite_input_is_refused(tmp_path: Path) -> None:
    u0 = np.zeros((6, 6))
    u0[5, 5] = np.nan  # in the last rank's block
    np.save(tmp_path / "u0.npy", u0)
    args = _heat_args((6, 6), 3, 0.2, tmp_path / "u0.npy", tmp_path / "out")
    result = run("heat", 4, args, timeout=60)
    assert result.returncode == 1
    (line,) = kernel_lines(result.stderr, "heat")
    assert "NaN or infinite" in line, line


def test_grid_too_small_for_process_grid(tmp_path: Path) -> None:
    np.save(tmp_path / "u0.npy", np.zeros((1, 8)))
    args = ["--nx", "8", "--ny", "1", "--steps", "1", "--in", str(tmp_path / "u0.npy")]
    result = run("heat", 4, [*args, "--out", str(tmp_path / "out")], timeout=60)
    assert result.returncode != 0
    (line,) = kernel_lines(result.stderr, "heat")
    assert "too small" in line and "2 x 2" in line, line
