"""SIGTERM and SIGHUP end a command the way Ctrl-C does: by unwinding, so cleanup runs.

Python's default SIGTERM action ends the process on the spot: no ``finally``, no ``atexit``.
``timeout``, batch schedulers, ``systemctl stop`` and a closed terminal (SIGHUP) all end
commands that way, and a run then left its temporary Prefect server behind. Prefect's flow
engine makes it worse on purpose: it turns SIGTERM into a ``TerminationSignal`` while a flow
runs (so tasks can cancel their work), then restores the previous handler and sends SIGTERM to
itself again, which with the default handler kills the process before anything outside the
flow is cleaned up.

``terminate_like_interrupt()`` installs a handler that raises ``Terminated``, a
``KeyboardInterrupt``, so every cleanup path written for Ctrl-C (``finally`` blocks, context
managers that stop servers, ``except KeyboardInterrupt``) applies unchanged; Prefect's re-sent
signal lands on it too. The caller turns it into the exit status a shell expects
(``128 + signal``: 130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType

import typer
from rich.console import Console

HANDLED = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum`` (SIGTERM or SIGHUP)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(signum)


def exit_status(e: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal that ended the command."""
    return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)


def signal_name(e: KeyboardInterrupt) -> str:
    return signal.Signals(e.signum).name if isinstance(e, Terminated) else "Ctrl-C"


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise ``Terminated`` in the main thread.

    A signal the process was started with ignored (``nohup`` ignores SIGHUP) stays ignored.
    """
    previous = {sig: signal.signal(sig, _raise) for sig in HANDLED
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def exit_on_interrupt(err: Console) -> Iterator[None]:
    """An interrupted command says so in one line and exits 128 + the signal, no traceback.

    By the time the interrupt reaches this block every cleanup inside it has run (ranks
    cancelled, servers stopped), which is what the message tells the user.
    """
    try:
        yield
    except KeyboardInterrupt as e:
        err.print(f"[yellow]interrupted[/] ({signal_name(e)}): stopped the ranks and the "
                  "servers this run started", highlight=False)
        raise typer.Exit(exit_status(e)) from None
