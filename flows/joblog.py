"""A job's stdout/stderr as the pipeline shows them: forwarded to the Prefect log as they
grow, and the lines that say why a job failed (each rank's own ``rank N:`` message first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def forward(path: Path, offset: int, prefix: str, logger: Any) -> int:
    """Send the complete lines appended to ``path`` since ``offset`` to the log; returns the
    new offset (a partial last line waits for the next call)."""
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode(errors="replace").splitlines():
        if line.strip():
            logger.info("%s %s", prefix, line)
    return offset + end


def failure_lines(text: str, last: int = 15, sep: str = "\n") -> str:
    """The ranks' own error lines (``...: rank N: ...``), else the last ``last`` lines."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    own = [ln for ln in lines if ": rank " in ln]
    return "; ".join(own) if own else sep.join(lines[-last:])
