"""The checkpoint protocol (commit marker, fingerprint, pruning, integrity) on one process.

The kernels' restart tests exercise it through real MPI jobs killed mid-run; these check the
file-level rules directly and quickly. `_OneRank` is the single-rank case of the four
collectives the protocol uses, so the code under test is exactly what a 1-rank job runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mpi_jobs.checkpoint import COMPLETE, Checkpointer
from mpi_jobs.runtime import CollectiveError


class _OneRank:
    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's spelling
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def Barrier(self) -> None:  # noqa: N802
        pass

    def gather(self, value: Any, root: int = 0) -> list[Any]:
        return [value]

    def bcast(self, value: Any, root: int = 0) -> Any:
        return value


def _ckpt(root: Path, **fingerprint: Any) -> Checkpointer:
    return Checkpointer(_OneRank(), root, "demo", fingerprint or {"alpha": 0.2})  # type: ignore[arg-type]


def test_saved_state_comes_back_with_its_meta(tmp_path: Path) -> None:
    ck = _ckpt(tmp_path)
    field = np.arange(12.0).reshape(3, 4)
    ck.save(40, {"piece-0.npy": field}, {"pieces": {"piece-0.npy": [0, 3]}})
    found = ck.latest()
    assert found is not None and found.step == 40
    assert np.array_equal(found.load("piece-0.npy"), field)
    assert found.meta == {"pieces": {"piece-0.npy": [0, 3]}}
    record = json.loads((tmp_path / "demo-000000000040" / COMPLETE).read_text())
    assert record["fingerprint"] == {"alpha": 0.2} and record["ranks"] == 1
    assert not list(tmp_path.rglob(".*.tmp"))


def test_uncommitted_checkpoint_is_ignored(tmp_path: Path) -> None:
    ck = _ckpt(tmp_path)
    ck.save(10, {"a.npy": np.ones(3)})
    ck.save(20, {"a.npy": np.full(3, 2.0)})
    (tmp_path / "demo-000000000020" / COMPLETE).unlink()  # as if killed before the commit
    found = ck.latest()
    assert found is not None and found.step == 10
    assert np.array_equal(found.load("a.npy"), np.ones(3))


def test_only_the_newest_two_are_kept_and_later_ones_survive(tmp_path: Path) -> None:
    ck = _ckpt(tmp_path)
    for step in (10, 20, 30, 40):
        ck.save(step, {"a.npy": np.full(2, float(step))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-000000000030", "demo-000000000040"]
    ck.save(35, {"a.npy": np.zeros(2)})  # a rerun that is behind: 40 stays, 30 and 35 kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "demo-000000000030", "demo-000000000035", "demo-000000000040"]
    assert ck.latest(max_step=39).step == 35  # type: ignore[union-attr]
    assert ck.latest().step == 40  # type: ignore[union-attr]


def test_other_parameters_are_refused_with_the_difference(tmp_path: Path) -> None:
    _ckpt(tmp_path, alpha=0.2, nx=10).save(5, {"a.npy": np.ones(1)})
    with pytest.raises(CollectiveError, match=r"alpha: checkpoint has 0\.2, this run has 0\.1"):
        _ckpt(tmp_path, alpha=0.1, nx=10).latest()


def test_missing_file_falls_back_and_corruption_is_reported(tmp_path: Path) -> None:
    ck = _ckpt(tmp_path)
    ck.save(1, {"a.npy": np.ones(100)})
    ck.save(2, {"a.npy": np.full(100, 2.0)})
    (tmp_path / "demo-000000000002" / "a.npy").unlink()
    assert ck.latest().step == 1  # type: ignore[union-attr]
    path = tmp_path / "demo-000000000001" / "a.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    found = ck.latest()
    assert found is not None
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        found.load("a.npy")


def test_resaving_a_step_replaces_it_atomically(tmp_path: Path) -> None:
    ck = _ckpt(tmp_path)
    ck.save(7, {"a.npy": np.ones(4), "b.npy": np.ones(1)})
    ck.save(7, {"a.npy": np.zeros(4)})
    found = ck.latest()
    assert found is not None and set(found.record["files"]) == {"a.npy"}
    assert np.array_equal(found.load("a.npy"), np.zeros(4))
