"""How clusterflow talks to Prefect when the user has not pointed it at a server.

With ``PREFECT_API_URL`` set, Prefect is used exactly as configured; without it, a running
``clusterflow local up`` stack's server (``stack_api``). Otherwise a temporary
Prefect server runs for the one command against a SQLite database kept under the clusterflow
state dir, so the schema migration (~15 s) happens once, not on every run. The server-side
services a single CLI run never needs are switched off: the telemetry service in particular
races the first flow run for SQLite's write lock ("database is locked" tracebacks) and tries
to reach the internet. Must run before ``prefect`` is imported; every value is only a default.

The temporary server is ``prefect server start`` started by us (``temporary_server``), not
Prefect's ephemeral server: Prefect starts that one as a plain subprocess stopped only by an
``atexit`` hook, so a SIGKILLed run left it running for ever. Ours gets a parent-death signal
(``infra.child_processes``) and is stopped by a context manager, so neither SIGKILL nor
SIGTERM can orphan it. It also starts while the CLI imports Prefect and the flow, instead of
after.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from flows.prefect_refresh import refresh_settings
from infra.child_processes import die_with_parent

LOCAL_SERVER_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_FOREMAN_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    # 2-core CI machines need longer than the 20 s default for the first (migrating) start.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


# The local stack's state file (flows.local_stack.STATE_FILE), named here so that a run can
# find the stack without importing that module (~0.5 s).
STACK_STATE = "local-stack.json"


def stack_api(state_dir: Path) -> str | None:
    """The Prefect API of the ``clusterflow local up`` stack under ``state_dir``, if it
    answers. A run beside a running stack goes there, as its AWS calls go to the stack's moto
    (``infra.aws.embedded.recorded_server``): it shows in the stack's UI with its artifacts,
    and it starts no server of its own (~5 s of a warm run). A stopped stack refuses at
    once; a busy one answering late is still the stack's."""
    try:
        url = json.loads((state_dir / STACK_STATE).read_text()).get("prefect_api_url")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(url, str) or not url:
        return None
    for _ in range(3):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return url
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                return None
        except OSError:
            pass
    return None


def configure(state_dir: Path) -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    if os.environ.get("PREFECT_API_URL"):
        return
    home = Path(os.environ.setdefault("PREFECT_HOME", str(state_dir / "prefect")))
    home.mkdir(parents=True, exist_ok=True)  # Prefect's SQLite cannot create its folder
    for key, value in LOCAL_SERVER_DEFAULTS.items():
        os.environ.setdefault(key, value)


class PrefectServerError(RuntimeError):
    """The temporary Prefect server did not come up; the message names its log."""


class TemporaryServer:
    """``prefect server start`` on a free 127.0.0.1 port, tied to this process's life."""

    def __init__(self, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal is ours to handle, not its
                preexec_fn=die_with_parent())

    def wait_ready(self) -> str:
        """Block until the server answers ``/health``; returns the API URL."""
        key = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"  # the same patience
        timeout = float(os.environ.get(key) or LOCAL_SERVER_DEFAULTS[key])
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.api_url
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None:
                raise PrefectServerError(
                    f"the temporary Prefect server exited at start (code "
                    f"{self.proc.returncode}); see {self.log}")
            if time.monotonic() > deadline:
                raise PrefectServerError(
                    f"the temporary Prefect server did not answer within {timeout:.0f} s; "
                    f"see {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def temporary_server(state_dir: Path) -> Iterator[TemporaryServer | None]:
    """Configure Prefect (``configure``) and, without ``PREFECT_API_URL``, start a server.

    Yields the server (call ``wait_ready()`` before the first flow runs; the start overlaps
    whatever the caller imports meanwhile), or None when the user's own API is used. The
    server is stopped when the block ends, however it ends; a SIGKILLed caller takes it down
    through the parent-death signal.
    """
    if not os.environ.get("PREFECT_API_URL") and (url := stack_api(state_dir)):
        os.environ["PREFECT_API_URL"] = url
        configure(state_dir)
        refresh_settings()
        try:
            yield None
        finally:
            _flush_prefect_clients()
            os.environ.pop("PREFECT_API_URL", None)
        return
    configure(state_dir)
    if os.environ.get("PREFECT_API_URL"):
        refresh_settings()  # a no-op unless Prefect is imported already (flows.prefect_refresh)
        yield None
        return
    server = TemporaryServer(state_dir / "logs" / "prefect-temporary-server.log")
    os.environ["PREFECT_API_URL"] = server.api_url  # read when prefect is imported
    refresh_settings()
    try:
        yield server
    finally:
        _flush_prefect_clients()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


@contextlib.contextmanager
def without_heartbeat() -> Iterator[None]:
    """Prefect's settings with flow-run heartbeats off, for the block.

    A CLI run is watched by its caller; the heartbeat thread would only add ~1 s. This is
    ``temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})`` without its
    cost: that rebuilds every setting from every source (0.04-0.1 s on a 2-core VM, in each
    run's flow-run creation); here one nested model is copied with the one value changed.
    """
    from prefect.context import SettingsContext, get_settings_context

    context = get_settings_context()
    settings = context.settings
    flows = settings.flows.model_copy(update={"heartbeat_frequency": None})
    with SettingsContext(profile=context.profile,
                         settings=settings.model_copy(update={"flows": flows})):
        yield


def _flush_prefect_clients() -> None:
    """Send the logs and events still queued in this process before the server goes.

    Prefect sends them from background workers that drain only at interpreter exit, which
    is after our server has stopped ("Error logging to API" on every run otherwise).
    """
    if "prefect" not in sys.modules:
        return
    from prefect.logging.handlers import APILogHandler

    with contextlib.suppress(Exception):  # best effort: never turn a result into an error
        APILogHandler().flush()  # drains every Prefect queue service (logs and events)
