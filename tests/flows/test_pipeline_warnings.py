"""A plain ``clusterflow run`` prints no warning a user cannot act on (issue 13, class 9).

Every ``make run`` used to print Prefect's "Ignoring `cache_policy` because `persist_result`
is False": the flow switched result persistence off on a task that has a cache key. Runs
without ``reuse_result`` now use the same task without a cache key.
"""

from __future__ import annotations

import yaml

from flows.spec import DEFAULT_SPEC
from tests.conftest import run_cli

WARNING = "Ignoring `cache_policy`"


def test_plain_run_prints_no_cache_policy_warning(aws, cli_env, tmp_path):
    spec = yaml.safe_load(DEFAULT_SPEC.read_text())
    spec["kernel"]["parameters"] = {"nx": 32, "ny": 32, "steps": 5, "alpha": 0.2}
    spec["scratch_dir"] = str(tmp_path / "scratch")
    spec["storage"] = {"input_bucket": "warn-inputs", "results_bucket": "warn-results"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    proc = run_cli(["run", "--spec", str(path), "--json"], cli_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Task run 'mpi_run" in proc.stderr  # the task ran and logged (not cached away)
    assert WARNING not in proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
