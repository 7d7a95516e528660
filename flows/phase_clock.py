"""Wall-clock marks of where one ``clusterflow run`` spends its fixed seconds.

``bench/steps_overhead.py`` needs the phases of a real run, in the run's own process:
phases timed in separate interpreters do not add up to a run on a noisy machine. With
``CLUSTERFLOW_PHASE_FILE`` set, each ``mark`` appends ``name epoch_seconds`` to that file
(a few lines per run); unset, it is one dictionary lookup. The bench subtracts consecutive
marks (and its own clock before the process started and after it ended).
"""

from __future__ import annotations

import os
import time

ENV = "CLUSTERFLOW_PHASE_FILE"


def mark(name: str) -> None:
    """Record that phase ``name`` ends now (only when ``CLUSTERFLOW_PHASE_FILE`` is set)."""
    path = os.environ.get(ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{name} {time.time():.6f}\n")
    except OSError:  # a bench aid must never fail a run
        pass


def read(path: str | os.PathLike[str]) -> list[tuple[str, float]]:
    """The marks a run wrote, in order."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            name, _, stamp = line.strip().rpartition(" ")
            if name:
                out.append((name, float(stamp)))
    return out
