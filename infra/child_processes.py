"""Child processes that do not outlive the process that started them.

A ``clusterflow run`` starts servers and MPI jobs (the embedded moto server, ``mpiexec`` and
its ranks, a temporary Prefect server). A clean exit, Ctrl-C or SIGTERM stops them through
``finally`` blocks, but SIGKILL (an OOM kill, ``kill -9``, a scheduler's hard limit) runs no
Python at all, so the children used to be re-parented to init and ran on for ever.

Linux can deliver a signal to a child when its parent dies: ``prctl(PR_SET_PDEATHSIG)``. It
must be set in the child, between ``fork`` and ``exec`` (``preexec_fn``); it survives
``exec`` and costs nothing. ``die_with_parent()`` returns such a ``preexec_fn``.

Two caveats the callers rely on:
- the signal is tied to the parent *thread* that forked, so start these children from a
  thread that lives as long as they should (the main thread, or the task that waits on them);
- a parent killed between ``fork`` and the ``prctl`` would be missed, so the child checks that
  its parent is still the one that forked it and exits at once otherwise.

Use it only for processes that belong to one command's lifetime; the long-lived local stack
(``clusterflow local up``) is meant to outlive the command that started it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl  # type: ignore[no-any-return]


# Resolved once in the parent: the child between fork and exec must not load libraries
# (other threads may have held the loader's locks at fork time).
_PRCTL = _load_prctl()


def supported() -> bool:
    """Whether this platform can tie a child's life to its parent (Linux)."""
    return _PRCTL is not None


def die_with_parent(sig: int = signal.SIGTERM,
                    then: Callable[[], None] | None = None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when this process dies.

    SIGTERM (the default) lets the child clean up after itself: ``mpiexec`` stops its ranks,
    a server closes its database. ``then`` runs afterwards in the child (for example the
    signal resets a caller already passes as ``preexec_fn``). Returns ``then`` unchanged where
    the platform has no parent-death signal.
    """
    if _PRCTL is None:
        return then
    prctl, parent = _PRCTL, os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        if then is not None:
            then()

    return preexec
