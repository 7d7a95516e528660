"""Monte Carlo VaR/ES: model and quantile arithmetic in-process, the MPI kernel via mpiexec."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from mpi_jobs.montecarlo import (
    MonteCarlo,
    largest,
    quantile_rank,
    reference_var,
    tail_size,
    var_es,
)
from mpi_jobs.portfolio import Portfolio, PortfolioError, load_portfolio
from mpi_jobs.var import _parse_args, _share
from tests.kernel_launch import (
    kernel_lines,
    kill_one_rank_once,
    newest_checkpoint_step,
    run,
    run_ok,
    start,
)


def _portfolio_file(path: Path, **changes: object) -> Path:
    raw = json.loads(load_portfolio(None)[0].model_dump_json())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return path


def _model(portfolio: Portfolio | None = None, **kw: object) -> MonteCarlo:
    settings: dict = {"distribution": "normal", "df": 5.0, "seed": 11, "paths": 10_007,
                      "block_paths": 1000}
    settings.update(kw)
    return MonteCarlo.build(portfolio or load_portfolio(None)[0], **settings)


# --------------------------------------------------------------------------- in-process


def test_quantile_rank_reads_confidence_as_an_exact_decimal() -> None:
    assert quantile_rank("0.99", 100) == 99  # 0.99 * 100 in binary is 99.00000000000001
    assert quantile_rank("0.99", 101) == 100
    assert quantile_rank("0.5", 3) == 2
    assert tail_size("0.99", 100_000) == 1001
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile_rank("1", 10)


def test_var_es_from_the_tail_equals_full_sort() -> None:
    losses = np.random.default_rng(1).standard_t(3, size=9_999)
    m = quantile_rank("0.95", losses.size)
    t = tail_size("0.95", losses.size)
    ordered = np.sort(losses)
    var, es = var_es(largest(losses, t), t)
    assert var == ordered[m - 1]
    assert es == math.fsum(ordered[m - 1 :].tolist()) / t


def test_blocks_use_the_spawned_child_streams() -> None:
    mc = _model(paths=5_500, block_paths=1000)
    children = np.random.SeedSequence(11).spawn(mc.blocks)
    z = np.random.Generator(np.random.PCG64(children[3])).standard_normal((1000, 8))
    # Recompute block 3's losses from the spawned child's numbers, the plain numpy way.
    a = mc.chol @ z.T
    expected = -(mc.position[:, None] * np.expm1(mc.drift[:, None] + mc.vol[:, None] * a)).sum(0)
    assert np.allclose(mc.block_losses(3), expected, rtol=1e-10, atol=1e-4)
    assert mc.block_size(5) == 500 and mc.block_losses(5).size == 500
    assert np.array_equal(mc.block_losses(3), mc.block_losses(3))


def test_single_asset_normal_var_matches_the_closed_form() -> None:
    one = Portfolio(name="one", horizon_days=10, assets=[
        {"name": "equity", "position": 1e6, "mu": 0.05, "sigma": 0.2}], correlation=[[1.0]])
    mc = _model(one, paths=200_000, block_paths=1 << 14)
    var, es = reference_var(mc, "0.99")
    # Loss is decreasing in the return, so its 99% quantile is the return's 1% quantile.
    z = NormalDist().inv_cdf(0.01)
    exact = -1e6 * math.expm1(float(mc.drift[0]) + float(mc.vol[0]) * z)
    assert abs(var - exact) / exact < 0.02
    assert es > var
    t_var, t_es = reference_var(_model(one, paths=200_000, distribution="t", df=3.0), "0.99")
    assert t_es > es  # same variance, fatter tail


def test_shares_cover_every_block_once() -> None:
    for count in (0, 1, 5, 17):
        for size in (1, 2, 3, 4, 7):
            covered = [b for r in range(size) for b in _share(10, count, size, r)]
            assert covered == list(range(10, 10 + count))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"correlation": [[1.0, 0.9], [0.9, 1.0]]}, "correlation must be 8 x 8"),
        ({"assets": []}, "assets"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_portfolios_name_the_problem(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(PortfolioError, match=message):
        load_portfolio(_portfolio_file(tmp_path / "p.json", **changes))


def test_correlation_must_be_positive_definite(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({
        "name": "x", "correlation": [[1, 0.9, -0.9], [0.9, 1, 0.9], [-0.9, 0.9, 1]],
        "assets": [{"name": n, "position": 1, "mu": 0, "sigma": 0.1} for n in "abc"]}))
    with pytest.raises(PortfolioError, match="not positive definite"):
        load_portfolio(path)
    path.write_text("{not json")
    with pytest.raises(PortfolioError, match="not valid JSON"):
        load_portfolio(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--confidence", "1.5"], "strictly between 0 and 1"),
        (["--df", "2"], "> 2"),
        (["--paths", "0"], "positive integer"),
        (["--dist", "cauchy"], "invalid choice"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse_args(["--paths", "10", "--out", "o", *argv], quiet=False)
    assert exc.value.code == 2
    (line,) = kernel_lines(capsys.readouterr().err, "var")
    assert message in line, line


# --------------------------------------------------------------------------- MPI kernel


@pytest.mark.parametrize(
    ("ranks", "dist", "confidence"),
    [(1, "normal", "0.99"), (2, "t", "0.975"), (3, "normal", "0.9"), (4, "t", "0.99")],
)
def test_matches_serial_reference_bitwise(
    tmp_path: Path, ranks: int, dist: str, confidence: str
) -> None:
    paths, block = 30_011, 1_000  # 31 blocks: uneven over every rank count
    out = tmp_path / "out"
    run_ok("var", ranks, ["--paths", str(paths), "--seed", "2024", "--confidence", confidence,
                          "--dist", dist, "--df", "4", "--block-paths", str(block),
                          "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    mc = _model(paths=paths, block_paths=block, seed=2024, distribution=dist, df=4.0)
    var, es = reference_var(mc, confidence)
    assert (result["var"], result["es"]) == (var, es)
    assert result["tail_paths"] == tail_size(confidence, paths)
    assert result["portfolio"] == "global-multi-asset-demo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["name"] for f in manifest["files"]] == ["result.json"]
    assert manifest["kernel"] == "var" and manifest["ranks"] == ranks
    assert len(manifest["rank_seconds"]) == ranks


def test_killed_run_restarts_bitwise_with_another_rank_count(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    args = ["--paths", "12000", "--block-paths", "100", "--seed", "5", "--out",
            str(tmp_path / "out"), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2"]
    # The delay leaves ~10 s between the checkpoint the kill waits for and the natural end, so a
    # stalled test process cannot miss the window on a loaded machine.
    proc = start("var", 2, args, env_extra={"CLUSTERFLOW_STEP_DELAY_SECONDS": "0.1"})
    kill_one_rank_once(proc, lambda: newest_checkpoint_step(ckpt, "var") >= 20)
    resumed = newest_checkpoint_step(ckpt, "var")
    assert 20 <= resumed < 120

    result = run("var", 3, [*args, "--restart"])
    assert result.returncode == 0, result.stderr
    assert f"restarting after block {resumed}" in result.stdout
    got = json.loads((tmp_path / "out" / "result.json").read_text())
    var, es = reference_var(_model(paths=12_000, block_paths=100, seed=5), "0.99")
    assert (got["var"], got["es"]) == (var, es)


def test_bad_portfolio_fails_with_one_line(tmp_path: Path) -> None:
    bad = _portfolio_file(tmp_path / "p.json", horizon_days=-1)
    result = run("var", 2, ["--paths", "100", "--portfolio", str(bad), "--out",
                            str(tmp_path / "out")], timeout=60)
    assert result.returncode == 1
    (line,) = kernel_lines(result.stderr, "var")
    assert "horizon_days" in line and str(bad) in line, line


def test_failing_rank_aborts_the_job(tmp_path: Path) -> None:
    result = run("var", 3, ["--paths", "10000000", "--block-paths", "1000", "--out",
                            str(tmp_path / "out")],
                 env_extra={"CLUSTERFLOW_VAR_FAIL_RANK": "2"}, timeout=60)
    assert result.returncode != 0
    assert "var: rank 2: RuntimeError: injected failure" in result.stderr, result.stderr
    assert not (tmp_path / "out" / "result.json").exists()
