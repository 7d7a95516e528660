"""The srun guard with a stand-in ``srun`` (a shell script): exit codes, signals, stderr.

The real srun's behaviour (exit 0 after "task N launch failed") is shown against the local
Slurm in ``test_slurm.py``; here each way out of the wrapper is checked without a scheduler.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.backends.launchers import SRUN_GUARD, SrunLauncher
from infra.backends.srun_guard import EXIT_NOT_LAUNCHED, launch_failures


def _fake(tmp_path: Path, body: str) -> Path:
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/bash\n" + body + "\n")
    srun.chmod(0o755)
    return srun


def _guard(tmp_path: Path, body: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SRUN_GUARD), str(_fake(tmp_path, body))],
                          capture_output=True, text=True, timeout=30, **kw)


def test_exit_0_after_a_launch_failure_becomes_126_with_the_reason(tmp_path: Path) -> None:
    proc = _guard(tmp_path, 'echo out; echo "srun: error: task 1 launch failed: Unspecified '
                            'error" >&2; exit 0')
    assert proc.returncode == EXIT_NOT_LAUNCHED == 126
    assert proc.stdout == "out\n"  # stdout is not touched
    assert proc.stderr.startswith("srun: error: task 1 launch failed: Unspecified error\n")
    assert "srun exited 0 but 1 task launch(es) failed" in proc.stderr


def test_a_failure_line_split_across_reads_and_without_a_newline_is_seen(tmp_path) -> None:
    proc = _guard(tmp_path, 'printf "srun: error: task 0-1 "; sleep 0.2; '
                            'printf "launch failed: x" >&2; exit 0')
    # The first half went to stdout here, so the stderr line is incomplete: not a match.
    assert proc.returncode == 0
    proc = _guard(tmp_path, 'printf "srun: error: task 0-1 " >&2; sleep 0.2; '
                            'printf "launch failed: x" >&2; exit 0')
    assert proc.returncode == 126, proc.stderr


@pytest.mark.parametrize("code", [0, 3])
def test_other_exits_pass_through_unchanged(tmp_path: Path, code: int) -> None:
    proc = _guard(tmp_path, f'echo "rank said: task 1 launch failed" >&2; exit {code}')
    assert proc.returncode == code
    assert proc.stderr == "rank said: task 1 launch failed\n"
    # srun's own failure with a launch error keeps srun's code
    proc = _guard(tmp_path, 'echo "srun: error: task 0 launch failed: x" >&2; exit 7')
    assert proc.returncode == 7


def test_a_signal_reaches_srun_and_srun_s_death_by_it_is_passed_up(tmp_path: Path) -> None:
    marker = tmp_path / "got-term"
    # The stand-in notes the TERM, then dies of it (as srun does once the step has ended).
    srun = _fake(tmp_path, f"trap 'touch {marker}; kill $child; trap - TERM; kill -TERM $$' TERM"
                           "\nsleep 30 >/dev/null 2>&1 & child=$!; wait")
    proc = subprocess.Popen([sys.executable, str(SRUN_GUARD), str(srun)],
                            stderr=subprocess.PIPE)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # to the guard only, not its process group
    assert proc.wait(timeout=10) == -signal.SIGTERM
    assert marker.exists()


def test_launch_failures_and_the_launcher_command() -> None:
    text = (b"srun: error: task 3 launch failed: Slurmd could not connect IO\n"
            b"srun: error: vm: task 0: Exited with exit code 1\nrank 2: launch failed\n")
    assert launch_failures(text) == [b"srun: error: task 3 launch failed: Slurmd could not "
                                     b"connect IO"]
    cmd = SrunLauncher(extra_args=("--overcommit",)).command(2, ["prog"])
    assert cmd == [sys.executable, str(SRUN_GUARD), "srun", "--mpi=pmix", "-n", "2",
                   "--kill-on-bad-exit=1", "--overcommit", "prog"]
    assert SrunLauncher(guard=False).command(1, ["p"])[0] == "srun"
