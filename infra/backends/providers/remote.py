"""What the remote providers (ParallelCluster, AWS Batch) share.

The pipeline builds the kernel's argv with ``infra.backends.launchers.python_module``, i.e.
with *this* machine's interpreter path. On a cluster or in a container that path means
nothing, so a remote launcher swaps it for the remote interpreter; any other argv is passed as is.

The pipeline forwards ``JobHandle.stdout`` / ``stderr`` to the Prefect log by reading the local
files. A remote provider keeps those files as local mirrors of the remote output and appends
to them on each ``status()`` call, so the pipeline's log forwarding works unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path


def remote_argv(argv: list[str], python: str) -> list[str]:
    if argv and argv[0] == sys.executable:
        return [python, *argv[1:]]
    return list(argv)


def mirror_paths(workdir: Path, job_name: str) -> tuple[Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    out, err = workdir / f"{job_name}.out", workdir / f"{job_name}.err"
    for p in (out, err):
        p.touch()
    return out, err


def append(path: Path, data: bytes) -> None:
    if data:
        with path.open("ab") as f:
            f.write(data)
