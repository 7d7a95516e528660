"""The Python API inside a user's own Prefect flow: one session, several steps, real ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

USER_FLOW = '''
import json, sys
from prefect import flow
from clusterflow import mpi_step, session

@flow
def my_pipeline(results: str, script_dir: str) -> dict:
    with session(results, backend="local", name="userflow") as s:
        make = mpi_step(s, "make", ["python", script_dir + "/point.py", "6", "{out}"],
                        launcher="none", ranks=1)
        pi = mpi_step(s, "pi", ["python", REPO + "/examples/mpi4py-montecarlo/pi.py",
                                "--samples", "200000", "--out", "{out}/estimate.json"],
                      ranks=2)
        both = mpi_step(s, "both", ["python", script_dir + "/total.py", "{inputs.made}",
                                    "{out}/total.json", "{inputs.pi}"],
                        inputs={"made": make, "pi": pi["outputs"][0]["s3"]},
                        launcher="none", ranks=1)
        return {"run_id": s.run_id, "make": make, "pi": pi, "both": both}

print(json.dumps(my_pipeline(sys.argv[1], sys.argv[2])))
'''


def test_mpi_step_in_a_users_own_flow(aws, cli_env, tmp_path):
    aws.client("s3").create_bucket(Bucket="api-results")
    script = tmp_path / "my_flow.py"
    script.write_text(f"REPO = {str(REPO)!r}\n" + USER_FLOW)
    cli_env["AWS_ENDPOINT_URL"] = aws.endpoint_url
    proc = subprocess.run([sys.executable, str(script), "s3://api-results/mine/",
                           str(REPO / "tests" / "fixtures" / "steps")], env=cli_env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    run_id = out["run_id"]
    s3 = aws.client("s3")
    (made,) = out["make"]["outputs"]
    assert made["s3"] == f"s3://api-results/mine/{run_id}/make/value.json"
    body = s3.get_object(Bucket="api-results", Key=f"mine/{run_id}/both/total.json")["Body"]
    total = json.loads(body.read())
    estimate = json.loads(Path(out["pi"]["out_dir"], "estimate.json").read_text())
    assert total["sum_of_squares"] == 36 and total["extra"] == [estimate]
    assert estimate["ranks"] == 2
