"""The local stack's warm runner: ``clusterflow run`` without importing Prefect every time.

Every ``clusterflow run`` in a fresh interpreter imports Prefect, the pipeline and boto3
(1.2-1.4 s of a run's ~2 s fixed overhead on a 2-core VM, more than the 1 s budget of issue
17). ``clusterflow local up`` starts this process once: it imports all of that, starts no
thread, and listens on a Unix socket (``flows.warm_client.socket_path``). For each run a
client hands over (``flows.warm_client``) it forks a child which becomes that run: the
caller's stdin/stdout/stderr descriptors, cwd, environment, umask, ignored signals and argv,
then the CLI's own ``run`` command, in-process, exactly as a fresh interpreter would (the
same Prefect flow run, artifacts, events, output and exit code). Fork is safe because this
process never has a second thread; each child starts its own (Prefect's log and event
workers, the boto3 prewarm) after the fork.

What a fresh interpreter would read from its environment at import is read again in the
child: Prefect's settings and logging (``flows.prefect_refresh``), rich's
consoles (``flows.cli`` is imported by the child, never here), Python's stdio encodings
(the client's own, sent with the request), ``tempfile``'s directory.

The runner relays, per run: the client's signals to the child, the child's exit status (or
the signal that ended it) to the client, and a client that vanished (SIGKILL) as SIGTERM to
the child, so the run's jobs are cancelled rather than orphaned. A request from another
installation, or once the installed code changed since this process started (a fingerprint
of the packages' sources and of site-packages), is declined and the client runs in-process;
the runner then re-executes itself (same pid) when no run is in flight, to serve the new code.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import os
import selectors
import signal
import socket
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from flows import warm_client

REPO = Path(__file__).resolve().parent.parent
HANDED_OVER = "client start, hand-over to the warm runner"  # a phase_clock mark
PACKAGES = ("flows", "event_bridge", "infra", "mpi_jobs")
# What a run imports before and while its flow runs (python -X importtime of a run). Not
# flows.cli and no other CLI module: they build rich consoles from the environment at import.
PRELOAD = (
    "typer", "rich.console", "rich.table", "rich.markup", "click",
    "flows.spec", "flows.budget", "flows.cli_commands", "flows.run_preflight",
    "flows.prefect_runtime", "flows.signals", "flows.fast_exit", "flows.phase_clock",
    "prefect", "prefect.settings", "prefect.flow_engine", "prefect.task_engine",
    "prefect.client.orchestration", "prefect.artifacts", "prefect.events",
    "flows.pipeline", "flows.steps.flow", "flows.prewarm", "flows.prefect_tls",
    "boto3", "botocore.client",
    # imported only once the flow runs (a run's sys.modules minus the above)
    "prefect.utilities.visualization", "anyio._backends._asyncio", "anyio.streams.memory",
    "anyio.streams.stapled", "anyio.streams.tls", "encodings.idna", "stringprep",
    "event_bridge.run_events", "infra.clusters.prices", "rich._emoji_codes",
    "typer._click.decorators", "typer._adapters",
)


def code_fingerprint() -> str:
    """Changes when any source file of the packages or the installed site-packages changes."""
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for root, dirs, files in os.walk(REPO / pkg):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith((".py", ".yaml", ".yml")):
                    st = os.stat(os.path.join(root, name))
                    h.update(f"{root}/{name} {st.st_mtime_ns} {st.st_size}\n".encode())
    for extra in (REPO / "pyproject.toml", Path(sysconfig.get_paths()["purelib"])):
        with contextlib.suppress(OSError):
            h.update(f"{extra} {extra.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()


def preload() -> None:
    """Import what a run needs, as a run would: Prefect configured first."""
    from flows import prefect_runtime
    from infra.aws.embedded import state_dir

    prefect_runtime.configure(state_dir())
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    from flows.prefect_refresh import remember_logging
    from flows.prewarm import SERVICES
    from infra.aws.clients import load_data_once

    remember_logging()
    load_data_once(SERVICES)
    from flows import prefect_tls

    prefect_tls.install()
    prefect_tls.shared_context()  # built here, once: a run with the same settings builds none
    complete_models("prefect")


def complete_models(package: str) -> int:
    """Finish the package's pydantic models that pydantic left to their first use.

    Prefect defines most of its client schemas with forward references, so pydantic builds
    their validators the first time each is used: in every run, for the flow run, its logs and
    each artifact (40-70 ms a run here). Built here once, every forked run inherits them.
    A model that cannot be finished yet is left as it was, for pydantic to finish on use.
    """
    from pydantic import BaseModel

    done = 0
    for name, module in list(sys.modules.items()):
        if module is None or not (name == package or name.startswith(package + ".")):
            continue
        for obj in list(vars(module).values()):
            if (isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == name
                    and not getattr(obj, "__pydantic_complete__", True)):
                with contextlib.suppress(Exception):
                    done += bool(obj.model_rebuild(raise_errors=False))
    return done


def thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


# ---------------------------------------------------------------------------- the child

def _reconfigure_stdio(stdio: list[list[object]]) -> None:
    for stream, want in zip((sys.stdin, sys.stdout, sys.stderr), stdio, strict=False):
        if stream is None or not want:
            continue
        encoding, errors, line_buffering, write_through = want
        with contextlib.suppress(Exception):
            stream.reconfigure(encoding=encoding, errors=errors,
                               line_buffering=bool(line_buffering),
                               write_through=bool(write_through))


def _become_the_run(req: dict, fds: list[int]) -> None:
    """In the forked child: take on the caller's process state, run the CLI, exit."""
    os.setpgid(0, 0)  # its own group: a signal meant for one run reaches no other
    for target, fd in enumerate(fds[:3]):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(req["cwd"])
    os.umask(int(req["umask"]))
    os.environ.clear()
    os.environ.update(req["env"])
    ignored = set(req.get("ignored", []))
    for sig in warm_client.FORWARDED:
        default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        signal.signal(sig, signal.SIG_IGN if int(sig) in ignored else default)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.argv = list(req["argv"])
    _reconfigure_stdio(req.get("stdio", []))
    tempfile.tempdir = None
    from flows import fast_exit, phase_clock

    # Prefect's settings and logging are rebuilt from this environment once the CLI has
    # configured it (flows.prefect_runtime.temporary_server -> flows.prefect_refresh).
    phase_clock.mark(HANDED_OVER)
    code: object = 0
    try:
        from flows.cli import app

        app()  # a finished run ends the process itself (flows.fast_exit)
    except SystemExit as e:
        code = e.code
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    fast_exit.exit_now(code)


# ---------------------------------------------------------------------------- the runner

@dataclass
class _Run:
    pid: int
    conn: socket.socket | None
    pidfd: int
    go: int  # write end of the pipe the child waits on until the client says "go"
    started: float = field(default_factory=time.monotonic)


class Runner:
    def __init__(self, home: Path, fingerprint: str) -> None:
        self.home = home
        self.path = warm_client.socket_path(str(home))
        self.fingerprint = fingerprint  # of the code as it was before the imports
        self.sel = selectors.DefaultSelector()
        self.runs: dict[int, _Run] = {}
        self.stopping = False
        self.stale = False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)  # the socket is the user's alone
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old)
        self.listener.listen(16)
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))

    def log(self, message: str) -> None:
        sys.stdout.write(f"{time.strftime('%H:%M:%S')} {message}\n")
        sys.stdout.flush()

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def serve(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._stop)
        self.log(f"runner ready on {self.path} (pid {os.getpid()}, "
                 f"{len(sys.modules)} modules imported)")
        closed = False
        while True:
            if self.stopping and not closed:
                self._close_listener()
                closed = True
                for run in self.runs.values():  # `down` signals them too; alone, we do
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(run.pid, signal.SIGTERM)
            if closed and not self.runs:
                self.log("runner stopped")
                return
            if self.stale and not self.runs and not self.stopping:
                self._reexec()
            for key, _ in self.sel.select(timeout=0.5):
                what, run = key.data
                try:
                    if what == "accept":
                        self._accept()
                    elif what == "conn":
                        self._from_client(run)
                    else:
                        self._reap(run)
                except Exception:  # one bad request must not take the runner down
                    self.log("error: " + traceback.format_exc())

    def _close_listener(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.listener)
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _reexec(self) -> None:
        self.log("the installed code changed: re-executing to serve it")
        self._close_listener()
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "flows.warm_runner",
                                  "--home", str(self.home)])

    def _decline(self, req: dict | None) -> str | None:
        if not req or req.get("op") not in ("run", "ping"):
            return "not a request"
        if req.get("op") == "ping":
            return None
        if req.get("package") != warm_client.package_dir():
            return "another installation"
        if self.stopping:
            return "stopping"
        if code_fingerprint() != self.fingerprint:
            self.stale = True
            return "stale"
        return None

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(5.0)
        fds: list[int] = []
        try:
            req, fds = warm_client.recv_msg(conn, maxfds=3)
            why = self._decline(req)
            if why is None and req is not None and req["op"] == "ping":
                self.stale = self.stale or code_fingerprint() != self.fingerprint
                warm_client.send_msg(conn, {"ok": True, "pid": os.getpid(),
                                            "runs": len(self.runs), "stale": self.stale})
                conn.close()
                return
            if why is not None or len(fds) != 3:
                warm_client.send_msg(conn, {"ok": False, "why": why or "no descriptors"})
                self.log(f"declined a run: {why or 'no descriptors'}")
                conn.close()
                return
            assert req is not None
            sys.stdout.flush()
            sys.stderr.flush()
            go_r, go_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns into this loop
                try:
                    os.close(go_w)
                    self.sel.close()
                    self.listener.close()
                    conn.close()
                    for other in self.runs.values():
                        if other.conn is not None:
                            other.conn.close()
                        os.close(other.pidfd)
                        if other.go >= 0:
                            os.close(other.go)
                    # Nothing happens until the client confirms it waits for this run: one
                    # that gave up meanwhile runs in-process, and this child then ends here.
                    if os.read(go_r, 1) != b"g":
                        os._exit(0)
                    os.close(go_r)
                    _become_the_run(req, fds)
                finally:
                    os._exit(70)
            os.close(go_r)
            run = _Run(pid=pid, conn=conn, pidfd=os.pidfd_open(pid), go=go_w)
            self.runs[pid] = run
            self.sel.register(run.pidfd, selectors.EVENT_READ, ("exit", run))
            self.sel.register(conn, selectors.EVENT_READ, ("conn", run))
            conn.settimeout(None)
            warm_client.send_msg(conn, {"ok": True, "pid": pid})
            self.log(f"run {pid}: {' '.join(req['argv'][1:])} (cwd {req['cwd']})")
        except Exception:
            conn.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def _from_client(self, run: _Run) -> None:
        assert run.conn is not None
        try:
            msg, _ = warm_client.recv_msg(run.conn)
        except OSError:
            msg = None
        if msg is None:  # the client is gone (SIGKILL): cancel the run as SIGTERM would
            self.sel.unregister(run.conn)
            run.conn.close()
            run.conn = None
            if run.go >= 0:  # it never said go: the child has not started anything
                os.close(run.go)
                run.go = -1
                return
            self.log(f"run {run.pid}: its client went away; SIGTERM")
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, signal.SIGTERM)
            return
        if msg.get("go") and run.go >= 0:
            os.write(run.go, b"g")
            os.close(run.go)
            run.go = -1
        if "signal" in msg:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.pid, int(msg["signal"]))

    def _reap(self, run: _Run) -> None:
        _, status = os.waitpid(run.pid, 0)
        self.sel.unregister(run.pidfd)
        os.close(run.pidfd)
        if run.go >= 0:
            os.close(run.go)
        del self.runs[run.pid]
        if os.WIFSIGNALED(status):
            reply = {"signal": os.WTERMSIG(status)}
        else:
            reply = {"exit": os.waitstatus_to_exitcode(status)}
        self.log(f"run {run.pid}: {reply} after {time.monotonic() - run.started:.1f} s")
        if run.conn is not None:
            with contextlib.suppress(OSError):
                warm_client.send_msg(run.conn, reply)
            self.sel.unregister(run.conn)
            run.conn.close()


def command(home: Path) -> list[str]:
    """How ``clusterflow local up`` starts the runner for the stack in ``home``."""
    return [sys.executable, "-m", "flows.warm_runner", "--home", str(home)]


def ping(home: Path, timeout: float = 2.0) -> dict | None:
    """The runner's answer to a ping, or None when none answers for ``home``."""
    sock = warm_client.connect(str(home), timeout=timeout)
    if sock is None:
        return None
    with sock:
        try:
            warm_client.send_msg(sock, {"op": "ping"})
            reply, _ = warm_client.recv_msg(sock)
        except OSError:
            return None
    return reply


def main() -> None:
    ap = argparse.ArgumentParser(description="The local stack's warm runner (see the module).")
    ap.add_argument("--home", type=Path, required=True)
    args = ap.parse_args()
    home = args.home.resolve()
    os.environ["CLUSTERFLOW_HOME"] = str(home)
    fingerprint = code_fingerprint()  # first: an edit during the imports makes us stale
    preload()
    # Every object imported so far lives as long as the runner: the children's garbage
    # collector then never walks (and so never copies, page by page) the runner's heap.
    gc.freeze()
    if thread_count() != 1:  # fork would copy a process whose other threads vanish
        sys.exit(f"error: the runner has {thread_count()} threads after its imports; "
                 "it cannot fork safely")
    Runner(home, fingerprint).serve()


if __name__ == "__main__":
    main()
