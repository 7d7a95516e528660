"""What every MPI kernel needs around its numerics: argument parsing, error reporting, aborts.

The failure model is shared by all kernels, so it lives here once:

* Errors that every rank detects identically (bad flags, a bad input that rank 0 checked and
  broadcast, a malformed record that the ranks agreed on collectively) are `CollectiveError`:
  rank 0 prints one ``<kernel>: <message>`` line and every rank exits 1 on its own. No
  ``MPI_Abort`` is needed because nobody is left waiting.
* Anything else is reported as one ``<kernel>: rank R: <message>`` line and the job is aborted
  with ``MPI_Abort``: the other ranks may be blocked in a collective or a halo exchange and
  would otherwise hang until the scheduler's wall-clock limit. The pipeline picks these lines
  out of the launcher's stderr by their ``": rank "``.

mpi4py is imported inside functions, never at module level, because importing ``MPI``
initialises MPI: tools that only want a kernel's serial reference (tests, flows) must not
become MPI singletons as a side effect.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from mpi4py import MPI

STEP_DELAY_ENV = "CLUSTERFLOW_STEP_DELAY_SECONDS"


class CollectiveError(Exception):
    """An error that every rank raises identically, so all can exit without ``MPI_Abort``."""


class KernelParser(argparse.ArgumentParser):
    """Every rank parses (so all reach the same verdict); only rank 0 prints, so a typo
    yields one message instead of one per rank. Errors are ``<kernel>: error: ...``."""

    def __init__(self, *, kernel: str, quiet: bool, **kwargs: Any) -> None:
        self._kernel = kernel
        self._quiet = quiet
        kwargs.setdefault("prog", f"python -m mpi_jobs.{kernel}")
        super().__init__(**kwargs)

    def print_usage(self, file: IO[str] | None = None) -> None:
        if not self._quiet:
            super().print_usage(file)

    def print_help(self, file: IO[str] | None = None) -> None:
        if not self._quiet:
            super().print_help(file)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message and not self._quiet:
            sys.stderr.write(message)
        raise SystemExit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self._kernel}: error: {message}\n")


# --------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_checkpoint_args(parser: argparse.ArgumentParser, *, unit: str, default_every: int) -> None:
    """The same three checkpoint flags on every kernel, so a pipeline can pass them blindly."""
    group = parser.add_argument_group("checkpoint/restart")
    group.add_argument(
        "--checkpoint-dir",
        type=Path,
        metavar="DIR",
        help="write checkpoints here (e.g. on the scratch filesystem); off when omitted",
    )
    group.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=default_every,
        metavar="K",
        help=f"checkpoint every K {unit} (default: %(default)s)",
    )
    group.add_argument(
        "--restart",
        action="store_true",
        help="resume from the newest complete checkpoint in --checkpoint-dir that matches "
        "these parameters (starts from the beginning when there is none)",
    )


def check_checkpoint_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.restart and args.checkpoint_dir is None:
        parser.error("--restart needs --checkpoint-dir to know where the checkpoints are")


# --------------------------------------------------------------------------- environment


def fail_rank(env_name: str) -> int | None:
    """The rank that should fail on purpose (env `env_name`), for failure-path testing."""
    raw = os.environ.get(env_name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise CollectiveError(f"{env_name}={raw!r} is not a rank number") from None


def step_delay() -> float:
    """Seconds to sleep after each step/block/round (env ``CLUSTERFLOW_STEP_DELAY_SECONDS``).

    Stretches a small run so a test or an operator can kill it mid-way and exercise restart;
    0 (the default) costs nothing.
    """
    raw = os.environ.get(STEP_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise CollectiveError(f"{STEP_DELAY_ENV}={raw!r} is not a number of seconds") from None
    if not value >= 0.0:
        raise CollectiveError(f"{STEP_DELAY_ENV}={raw!r} must be >= 0")
    return value


# --------------------------------------------------------------------------- filesystem checks


def prepare_out(out_dir: Path) -> str | None:
    """Create the output directory; return a user-facing problem, or None."""
    if out_dir.exists() and not out_dir.is_dir():
        return f"--out {out_dir} exists and is not a directory"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out_dir}: cannot create output directory ({exc.strerror or exc})"
    if not os.access(out_dir, os.W_OK | os.X_OK):
        return f"--out {out_dir}: output directory is not writable"
    return None


def check_readable_file(flag: str, path: Path) -> str | None:
    if not path.exists():
        return f"{flag} {path}: no such file"
    if not path.is_file():
        return f"{flag} {path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{flag} {path} is not readable"
    return None


def rank0_check(comm: MPI.Intracomm, check: Callable[[], str | None]) -> None:
    """Run `check` on rank 0 only and raise its problem on every rank.

    Only rank 0 touches the filesystem for validation, so every rank takes the same branch and
    the user sees a single message.
    """
    problem = check() if comm.Get_rank() == 0 else None
    problem = comm.bcast(problem, root=0)
    if problem is not None:
        raise CollectiveError(problem)


def agree(comm: MPI.Intracomm, problem: str | None) -> None:
    """Collective: raise the lowest rank's problem on every rank, if any rank has one.

    For errors found in data only one rank sees (a malformed record in its byte range): the
    ranks agree first, so the job ends with one clear line instead of an ``MPI_Abort``.
    """
    problems = comm.allgather(problem)
    for found in problems:
        if found is not None:
            raise CollectiveError(found)


# --------------------------------------------------------------------------- entry point


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_kernel(kernel: str, body: Callable[[MPI.Intracomm], int]) -> int:
    """Run `body(COMM_WORLD)` under the shared failure model; returns the exit status."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        print(f"{kernel}: cannot import mpi4py ({exc})", file=sys.stderr)
        return 1

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    try:
        return body(comm)
    except CollectiveError as exc:
        if rank == 0:
            print(f"{kernel}: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        print(f"{kernel}: rank {rank}: {one_line(exc)}", file=sys.stderr, flush=True)
        if size > 1:
            comm.Abort(1)
        return 1


class RankTimer:
    """Compute seconds of this rank, excluding start-up and output, for the manifest."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0: float | None = None

    def __enter__(self) -> RankTimer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._t0 is not None
        self.seconds += time.perf_counter() - self._t0
        self._t0 = None
