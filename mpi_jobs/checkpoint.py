"""Collective, crash-safe checkpoints for the MPI kernels.

Layout: one directory per checkpoint, ``<DIR>/<kernel>-<step:012d>/``, holding the files the
ranks wrote (each written atomically: temp file, fsync, rename) and, last, ``COMPLETE.json``,
written by rank 0 only after every rank has reported its files with their sha256 and size.
A checkpoint without ``COMPLETE.json`` is treated as never written, so a job killed at any
moment (mid-write included) leaves behind either complete checkpoints or ignorable debris; a
restart resumes from the newest complete one.

``COMPLETE.json`` also records a *fingerprint*: the parameters and input digests that the
saved state depends on. A restart refuses a checkpoint whose fingerprint differs from the
run's (say, another ``alpha``) with a message naming the difference, instead of silently
continuing someone else's state. Parameters that only say how far to go (``--steps``) are not
part of it, so a finished run can be extended.

Because the kernels are deterministic, a checkpoint of step S written by any run with the same
fingerprint *is* the state at step S; overwriting one with an identical re-run is harmless.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from mpi_jobs.manifest import atomic_write, atomic_write_text
from mpi_jobs.runtime import CollectiveError

if TYPE_CHECKING:
    from mpi4py import MPI

COMPLETE = "COMPLETE.json"
_FORMAT = 1


class _HashingWriter:
    """File wrapper that hashes and counts what passes through, so a checkpoint file is
    digested while it is written instead of being read back."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.bytes += view.nbytes
        return self._fh.write(view)


def _save_array(path: Path, array: np.ndarray) -> dict[str, Any]:
    info: dict[str, Any] = {}

    def write(fh: IO[bytes]) -> None:
        hw = _HashingWriter(fh)
        np.save(hw, np.ascontiguousarray(array), allow_pickle=False)  # type: ignore[arg-type]
        info.update(sha256=hw.digest.hexdigest(), bytes=hw.bytes)

    atomic_write(path, write)
    return info


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        if saved.get(key) != wanted.get(key):
            out.append(
                f"{key}: checkpoint has {saved.get(key)!r}, this run has {wanted.get(key)!r}"
            )
    return out


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint chosen for restart; `record` is its ``COMPLETE.json``."""

    directory: Path
    step: int
    record: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.record.get("meta", {})

    def load(self, name: str) -> np.ndarray:
        """Read one saved array, verifying it against the digest recorded at commit time."""
        entry = self.record["files"].get(name)
        if entry is None:
            raise FileNotFoundError(f"checkpoint {self.directory} has no file {name!r}")
        path = self.directory / name
        data = path.read_bytes()
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ValueError(
                f"checkpoint file {path} does not match its recorded sha256 (corrupted); "
                f"delete {self.directory} to restart from the previous checkpoint"
            )
        return np.load(io.BytesIO(data), allow_pickle=False)


class Checkpointer:
    """Saves and finds the checkpoints of one kernel run. All methods are collective."""

    def __init__(
        self,
        comm: MPI.Intracomm,
        root: Path,
        kernel: str,
        fingerprint: dict[str, Any],
        *,
        keep: int = 2,
    ) -> None:
        self.comm = comm
        self.root = Path(root)
        self.kernel = kernel
        # Round-trip through JSON so comparisons see exactly what a restart will read back.
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.keep = keep
        self.saved = 0

    def _dir(self, step: int) -> Path:
        return self.root / f"{self.kernel}-{step:012d}"

    def _steps(self) -> list[tuple[int, Path]]:
        pattern = re.compile(rf"{re.escape(self.kernel)}-(\d{{12}})")
        found = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                match = pattern.fullmatch(entry.name)
                if match and entry.is_dir():
                    found.append((int(match.group(1)), entry))
        return sorted(found)

    # ------------------------------------------------------------------ writing

    def prepare_root(self) -> str | None:
        """Create the checkpoint root (rank 0); return a user-facing problem, or None."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"--checkpoint-dir {self.root}: cannot create it ({exc.strerror or exc})"
        if not self.root.is_dir():
            return f"--checkpoint-dir {self.root} is not a directory"
        return None

    def save(
        self, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None
    ) -> None:
        """Write this rank's `arrays` (names unique across ranks) as part of checkpoint `step`.

        Only rank 0's `meta` is recorded. Returns once this rank's files are durable; rank 0
        returns after the commit.
        """
        comm = self.comm
        rank = comm.Get_rank()
        directory = self._dir(step)
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            # An earlier run may have left this step complete (or half-written): uncommit it
            # first, so a crash from here on can never pair its marker with our new files.
            with contextlib.suppress(FileNotFoundError):
                (directory / COMPLETE).unlink()
            for stray in directory.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    stray.unlink()
        comm.Barrier()
        files = {name: _save_array(directory / name, arr) for name, arr in arrays.items()}
        gathered = comm.gather(files, root=0)
        if rank != 0:
            return
        assert gathered is not None
        merged: dict[str, Any] = {}
        for part in gathered:
            clash = set(merged) & set(part)
            if clash:
                raise ValueError(f"checkpoint file names written by two ranks: {sorted(clash)}")
            merged.update(part)
        record = {
            "format": _FORMAT,
            "kernel": self.kernel,
            "step": step,
            "ranks": comm.Get_size(),
            "fingerprint": self.fingerprint,
            "files": merged,
            "meta": meta or {},
        }
        atomic_write_text(directory / COMPLETE, json.dumps(record, indent=1, allow_nan=False))
        self.saved += 1
        self._prune(step)

    def _prune(self, newest: int) -> None:
        """Keep the `keep` newest complete checkpoints up to `newest`; drop older debris.

        Checkpoints *after* `newest` (left by an earlier, longer run with the same
        fingerprint) are valid states and are left alone.
        """
        older = [(s, d) for s, d in self._steps() if s <= newest]
        complete = [(s, d) for s, d in older if (d / COMPLETE).is_file()]
        kept = {s for s, _ in complete[-self.keep :]}
        for step, directory in older:
            if step not in kept:
                shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------------ reading

    def _find(self, max_step: int | None) -> Checkpoint | str | None:
        for step, directory in reversed(self._steps()):
            if max_step is not None and step > max_step:
                continue
            try:
                record = json.loads((directory / COMPLETE).read_text())
            except FileNotFoundError:
                continue  # never committed: a crash mid-checkpoint
            except (OSError, ValueError) as exc:
                print(f"{self.kernel}: skipping checkpoint {directory}: unreadable "
                      f"{COMPLETE} ({exc})", file=sys.stderr)
                continue
            if record.get("kernel") != self.kernel or record.get("step") != step:
                continue
            diffs = _differences(record.get("fingerprint", {}), self.fingerprint)
            if diffs:
                return (
                    f"--restart: the newest checkpoint {directory} belongs to a different run "
                    f"({'; '.join(diffs)}); use another --checkpoint-dir or delete it"
                )
            missing = [
                name
                for name, entry in record.get("files", {}).items()
                if not (directory / name).is_file()
                or (directory / name).stat().st_size != entry["bytes"]
            ]
            if missing:
                print(f"{self.kernel}: skipping checkpoint {directory}: files missing or "
                      f"truncated: {', '.join(sorted(missing))}", file=sys.stderr)
                continue
            return Checkpoint(directory=directory, step=step, record=record)
        return None

    def latest(self, max_step: int | None = None) -> Checkpoint | None:
        """The newest complete checkpoint with step <= `max_step`, or None.

        Rank 0 decides and broadcasts, so every rank resumes from the same one.
        """
        found = self._find(max_step) if self.comm.Get_rank() == 0 else None
        found = self.comm.bcast(found, root=0)
        if isinstance(found, str):
            raise CollectiveError(found)
        return found
