"""The embedded default AWS: a moto server on 127.0.0.1, started, reused and stopped by us.

Order of preference, so nothing surprising happens:
1. ``AWS_ENDPOINT_URL`` is set: use it, start nothing.
2. A server recorded in ``<state dir>/moto.json`` (``clusterflow local up``) answers: reuse it.
3. Otherwise start one on a free port for the duration of the ``with`` block.
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

from infra.aws.clients import AwsConfigError, AwsMode, AwsTarget, real_target
from infra.child_processes import die_with_parent

STARTUP_TIMEOUT_S = 60.0
# moto's Batch runs jobs in Docker unless told otherwise; there is no Docker engine here.
MOTO_CONFIG = {"batch": {"use_docker": False}}


def state_dir() -> Path:
    return Path(os.environ.get("CLUSTERFLOW_HOME", ".clusterflow")).resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _configure(url: str, timeout: float = 2.0) -> None:
    """Readiness probe and configuration in one call: it only succeeds once moto serves."""
    req = urllib.request.Request(
        f"{url}/moto-api/config", data=json.dumps(MOTO_CONFIG).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()


def _answers(url: str, attempts: int = 1, timeout: float = 1.0) -> bool:
    for attempt in range(attempts):
        try:
            _configure(url, timeout=timeout)
            return True
        except (urllib.error.URLError, OSError):
            if attempt + 1 < attempts:
                time.sleep(0.5)
    return False


class MotoServer:
    """A moto server subprocess with clusterflow's extensions (``infra.aws.moto_server``).

    ``die_with_parent``: the server gets SIGTERM when this process dies, even by SIGKILL
    (for a server that lives for one command; the local stack's outlives ``local up``).
    """

    def __init__(self, log_path: Path, port: int | None = None,
                 die_with_parent: bool = False) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MotoServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infra.aws.moto_server", "-H", "127.0.0.1",
             "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[2], start_new_session=True,
            preexec_fn=die_with_parent() if self.die_with_parent else None,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise AwsConfigError(f"the embedded moto server exited at start:\n{tail}")
            if _answers(self.url):
                return self
            time.sleep(0.05)
        self.stop()
        raise AwsConfigError(
            f"the embedded moto server did not answer within {STARTUP_TIMEOUT_S:.0f} s; "
            f"see {self.log_path}"
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def recorded_server() -> str | None:
    """URL of a long-lived embedded server recorded by ``clusterflow local up``, if alive."""
    path = state_dir() / "moto.json"
    try:
        url = json.loads(path.read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    # A slow answer must not count as "gone": the caller would then start a private server
    # and the run would not see the stack's buckets. A stopped server refuses at once.
    return url if _answers(url, attempts=3, timeout=5.0) else None


@contextlib.contextmanager
def aws_target(mode: AwsMode, region: str) -> Iterator[AwsTarget]:
    """Yield the AwsTarget a run should use, starting the embedded endpoint if needed."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    if mode == "real" or endpoint:
        if mode == "embedded":
            yield AwsTarget(region=region, endpoint_url=endpoint, embedded=False)
        else:
            yield real_target(region)
        return
    url = recorded_server()
    if url:
        yield AwsTarget(region=region, endpoint_url=url, embedded=True)
        return
    server = MotoServer(state_dir() / "logs" / "moto.log", die_with_parent=True).start()
    try:
        yield AwsTarget(region=region, endpoint_url=server.url, embedded=True)
    finally:
        server.stop()
