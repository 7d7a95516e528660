"""Which files under a step's output folder are its results, with their sha256.

Shared by the flow (a step whose folder this machine sees) and the job-side hand-over of an
FSx-staged run (``infra.staging.fsx_job``, on the cluster), so both publish exactly the same
files: the standard library only. Links are never outputs: they are the inputs linked in, or
point elsewhere; the names in ``skip`` (``step.json``, a kernel's ``manifest.json``) are
records about the outputs, not outputs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def collect(out: Path, globs: Sequence[str] = (), skip: Iterable[str] = ()
            ) -> list[dict[str, object]]:
    """Every regular file under ``out`` that ``globs`` name (none: all), sorted, hashed."""
    skipped = set(skip)
    files: list[dict[str, object]] = []
    for root, dirs, names in os.walk(out):
        dirs.sort()
        for name in sorted(names):
            p = Path(root) / name
            if p.is_symlink() or not p.is_file():
                continue
            rel = p.relative_to(out).as_posix()
            if name in skipped or (globs and not any(fnmatch.fnmatchcase(rel, g)
                                                     for g in globs)):
                continue
            files.append({"name": rel, "sha256": sha256_of(p), "bytes": p.stat().st_size})
    return files
