"""``clusterflow deploy --pool P`` onto an existing ``clusterflow-slurm`` pool.

The README tells users to create the pool with the Slurm worker's type and then register the
project's deployments on it; ``deploy`` must use that pool as it is (never re-create it as a
``process`` pool, never reset its job template), so the flow runs land in Slurm.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import BIN
from tests.slurm_pool import create_pool

REPO = Path(__file__).resolve().parents[2]


def test_deploy_registers_every_deployment_on_an_existing_slurm_pool(
        prefect_api: str, tmp_path: Path) -> None:
    pool = f"slurm-deploy-{os.getpid()}"
    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        create_pool(client, pool, tmp_path / "slurm.conf", tmp_path / "jobs",
                    partition="long", tasks=4)
        template_before = client.read_work_pool(pool).base_job_template

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env["PREFECT_API_URL"] = prefect_api
    proc = subprocess.run([str(BIN / "clusterflow"), "deploy", "--pool", pool, "--json"],
                          cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["work_pool"] == pool
    names = {d["name"].split("/", 1)[1] for d in report["deployments"]}
    assert {"nightly", "on-upload", "on-result"} <= names

    with temporary_settings({PREFECT_API_URL: prefect_api}), \
            get_client(sync_client=True) as client:
        try:
            work_pool = client.read_work_pool(pool)
            assert work_pool.type == "clusterflow-slurm"
            # The template the user edited (partition, tasks) survives the deploy.
            assert work_pool.base_job_template == template_before
            props = work_pool.base_job_template["variables"]["properties"]
            assert props["partition"]["default"] == "long"
            assert props["tasks"]["default"] == 4
            for d in report["deployments"]:
                deployment = client.read_deployment(d["id"])
                assert deployment.work_pool_name == pool, d["name"]
                assert d["work_pool"] == pool
        finally:
            # Leave the session's server without triggers that would queue runs on a pool
            # no worker serves.
            for d in report["deployments"]:
                for a in client.request(
                        "GET", f"/automations/related-to/prefect.deployment.{d['id']}").json():
                    client.request("DELETE", f"/automations/{a['id']}")
                client.delete_deployment(d["id"])
