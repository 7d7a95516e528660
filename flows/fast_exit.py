"""Leave the ``clusterflow`` process without tearing the interpreter down.

After a run has printed its summary, the interpreter's own exit still tears down every
module Prefect, pydantic and botocore loaded (~1,700) and collects their objects: 0.5-0.7 s
of every ``clusterflow run`` on a busy 2-core VM (measured in ``bench/steps_overhead.py``,
the "process exit" phase), spent on nothing the user sees. ``exit_now`` does what the
interpreter's exit does that matters, in the same order (join non-daemon threads and run
the ``threading`` exit hooks, then the ``atexit`` callbacks: Prefect's log and event
workers drain there, ``logging`` flushes its handlers), flushes stdout/stderr and then
ends the process with ``os._exit``, skipping only the teardown.

It is armed only by a command that has finished its work (``arm``) and only used by the
console script's entry (``Typer.__call__``), never by ``CliRunner`` in tests, which would
lose its pytest process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading

_armed = False


def arm() -> None:
    """Let this process end with ``exit_now`` once the command returns."""
    global _armed
    _armed = True


def armed() -> bool:
    return _armed


def exit_code(code: object) -> int:
    """``SystemExit.code`` as the status the interpreter would exit with."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{code}\n")
    return 1


def exit_now(code: object) -> None:
    """End the process as the interpreter would, minus module teardown. Does not return."""
    status = exit_code(code)
    # The interpreter's own order (Py_FinalizeEx): threads first, then atexit callbacks.
    # Both are private but present since Python 3.4; without them, fall back to a normal exit.
    shutdown = getattr(threading, "_shutdown", None)
    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if shutdown is None or run_exitfuncs is None:
        sys.exit(status)
    shutdown()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
