"""Shared fixtures: one real moto server and one real Prefect server per test session.

Both are the real thing over HTTP; tests speak boto3 to moto exactly as the code does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.prefect_runtime import LOCAL_SERVER_DEFAULTS
from infra.aws.clients import AwsTarget
from infra.aws.embedded import MotoServer, _free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def aws(moto_server: MotoServer) -> AwsTarget:
    return AwsTarget(region="us-east-1", endpoint_url=moto_server.url, embedded=True)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``prefect server start`` shared by every CLI run in the session."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, **LOCAL_SERVER_DEFAULTS, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((home / "server.log").read_text()[-3000:])
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def cli_env(prefect_api: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running ``clusterflow`` as a user would, isolated per test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PREFECT_API_URL=prefect_api, CLUSTERFLOW_HOME=str(tmp_path / "home"))
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 180,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "clusterflow"), *args], env=env, cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)
