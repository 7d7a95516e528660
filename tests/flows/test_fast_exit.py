"""flows.fast_exit: the process ends as the interpreter would end it, minus the teardown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import atexit, sys, threading, time
from flows import fast_exit
atexit.register(lambda: print("atexit ran"))
def work():
    time.sleep(0.3)
    print("thread done")
threading.Thread(target=work).start()  # non-daemon: must finish before the exit
sys.stdout.write("buffered, no newline; ")
fast_exit.exit_now({code!r})
print("never")
"""


@pytest.mark.parametrize(("code", "status"), [(None, 0), (0, 0), (3, 3), ("bad thing", 1)])
def test_threads_then_atexit_run_and_buffers_are_flushed(code, status):
    out = subprocess.run([sys.executable, "-c", PROBE.format(code=code)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == status, out.stderr
    assert out.stdout == "buffered, no newline; thread done\natexit ran\n"
    if isinstance(code, str):
        assert out.stderr == "bad thing\n"


def test_the_cli_arms_it_only_for_a_finished_run():
    from typer.testing import CliRunner

    from flows import fast_exit
    from flows.cli import app

    result = CliRunner().invoke(app, ["run", "--spec", "/nonexistent.yaml"])
    assert result.exit_code == 2  # refused spec: nothing ran, the normal exit
    assert not fast_exit.armed()
