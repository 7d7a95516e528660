"""Fail a job step whose tasks never started, which ``srun`` itself reports as success.

When slurmd cannot start a step's tasks (it cannot connect the step's I/O, a PMIx server
does not come up, a prolog fails) Slurm 22.05's srun prints
``srun: error: task 0 launch failed: Slurmd could not connect IO`` for each task and still
exits 0, since no task ever sent it an exit code. The batch job then reads COMPLETED and a
pipeline would publish whatever the ranks did not write. This wrapper runs srun with its
stderr passed through line by line and turns "exit 0 after a launch failure" into exit 126
(the shell's "could not execute"), with a line saying why.

Run as ``python srun_guard.py srun ARGS...``: stdlib only, no imports from clusterflow, so any
python3 on the node runs it. Signals it receives go on to srun (scancel and a killed process
group reach srun directly too; srun ends the step once, however often it is told), and srun's
own end by a signal is passed up as the same signal, so Slurm records it as srun's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

LAUNCH_FAILED = re.compile(rb"^srun: error: task [0-9][0-9,\-]* launch failed")
EXIT_NOT_LAUNCHED = 126
# How the guard's (and the ParallelCluster exit trap's) verdict starts: what a caller looks
# for in the job's stderr to tell "never started" (safe to run again) from a rank's failure.
NOT_LAUNCHED_MARK = "clusterflow: srun exited 0 but"
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
              signal.SIGCONT)


def launch_failures(text: bytes) -> list[bytes]:
    """The ``srun: error: task N launch failed`` lines in ``text``."""
    return [ln for ln in text.splitlines() if LAUNCH_FAILED.match(ln)]


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except BrokenPipeError:
            return  # nobody reads our stderr any more; srun's exit status still matters


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: srun_guard.py srun [ARGS...]", file=sys.stderr)
        return 2
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)

    def forward(signum: int, _frame: object) -> None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    failed: list[bytes] = []
    partial = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        _write_all(2, chunk)
        whole, _, partial = (partial + chunk).rpartition(b"\n")
        failed += launch_failures(whole)
    failed += launch_failures(partial)
    rc = proc.wait()
    if rc < 0:  # srun ended by a signal: end the same way
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
        return 128 - rc
    if rc == 0 and failed:
        _write_all(2, (f"{NOT_LAUNCHED_MARK} {len(failed)} task launch(es) "
                       f"failed ({failed[0].decode(errors='replace')}); the step's ranks did "
                       f"not all run, so it ends with exit code {EXIT_NOT_LAUNCHED}\n").encode())
        return EXIT_NOT_LAUNCHED
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
