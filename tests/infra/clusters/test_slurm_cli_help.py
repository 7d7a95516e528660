"""``clusterflow slurm ... --help`` shows each option's default (issue 13, class 9).

The defaults used to be written as ``[default: ...]`` inside the help text, which rich reads
as a markup tag and drops, so the help ended in an empty "live ." instead of the default.
"""

from __future__ import annotations

import os

from tests.conftest import REPO, run_cli


def test_state_dir_help_ends_in_its_default():
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    proc = run_cli(["slurm", "up", "--help"], env, REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines()
             if line.strip("│ ").startswith("--")}
    assert "[default: ($CLUSTERFLOW_HOME/slurm)]" in lines["--state-dir"]
    assert "[default: (<state dir>/ctld-state)]" in lines["--state-save-location"]
