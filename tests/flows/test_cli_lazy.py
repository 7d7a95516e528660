"""The CLI starts without importing what the command does not use, and still has every command."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from flows.cli import app
from flows.cli_commands import LAZY


def test_starting_the_cli_imports_no_other_area_and_no_prefect():
    probe = ("import sys, flows.cli; "
             f"print(sorted(m for m in {sorted({m for m, _, _ in LAZY.values()})!r} "
             "+ ['prefect'] if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "[]"


def test_every_command_is_listed_and_runs_from_its_own_package():
    runner = CliRunner()
    listed = runner.invoke(app, ["--help"], terminal_width=200)
    assert listed.exit_code == 0
    for name in ["run", *LAZY]:
        assert f" {name} " in listed.output, name
    for name, (module, _, _) in LAZY.items():
        shown = runner.invoke(app, [name, "--help"], terminal_width=200)
        assert shown.exit_code == 0, (name, shown.output)
        usage = next(line for line in shown.output.splitlines() if "Usage:" in line)
        assert f" {name} " in usage, (name, usage)
        assert module in sys.modules
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2
