"""The one place the kernels get numba from, with the compile options they all rely on.

* ``fastmath=False``: no reassociation and no FMA contraction, so a compiled loop computes each
  value with exactly the operations written, in that order. The kernels' bitwise rank-count
  invariance and their equality with the numpy references depend on it.
* ``cache=True``: machine code is stored next to the module (or in numba's per-user cache
  when that is not writable, or under ``NUMBA_CACHE_DIR``), so only the first run compiles.
  Ranks started together may compile and store concurrently; numba writes cache files under
  temporary names and renames them into place, so a reader sees a complete entry or none.
* ``error_model="numpy"``: no Python-style zero-division checks in the inner loops.

Numba's error highlighting initialises colorama, which writes an ANSI reset to stdout at exit
when stdout is a terminal; under mpiexec it is one (a pty per rank), and the stray escape ended
up in the pipeline's logs. Highlighting is switched off before numba is imported.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING", "1")

import numba  # noqa: E402

OPTIONS: dict[str, Any] = {
    "cache": True,
    "nogil": True,
    "fastmath": False,
    "error_model": "numpy",
}


def jit(func: Callable[..., Any]) -> Any:
    """``numba.njit`` with `OPTIONS`."""
    return numba.njit(**OPTIONS)(func)
