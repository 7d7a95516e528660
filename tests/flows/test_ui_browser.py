"""The Prefect UI of a ``clusterflow local up`` stack, looked at in a real headless Chromium.

After a run on the stack: the flow run's page says Completed and lists its task runs; the
artifacts pages show the run's summary and the heat field picture (a loaded image). Each
page is saved as a screenshot under ``.clusterflow/test-output/ui/`` (or
``$CLUSTERFLOW_TEST_OUTPUT/ui``) for a person to look at.

Skipped only where no browser can be installed (not root and no /usr/bin/chromium); on
Debian as root the ``chromium`` package is installed.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import yaml

from flows.spec import DEFAULT_SPEC
from tests.browser import Browser, NoBrowser, ensure_chromium
from tests.conftest import REPO, run_cli
from tests.flows.test_local_stack import _cli, _env

OUTPUT = Path(os.environ.get("CLUSTERFLOW_TEST_OUTPUT", REPO / ".clusterflow" / "test-output"))


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        return ensure_chromium()
    except NoBrowser as e:
        pytest.skip(f"no browser can be installed here: {e}")


def _latest_flow_run(api: str, flow_name: str) -> tuple[str, str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> tuple[str, str, str]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                sort=FlowRunSort.START_TIME_DESC, limit=1)
            return str(runs[0].id), runs[0].name, runs[0].state_name or ""

    with temporary_settings({PREFECT_API_URL: api}):
        return asyncio.run(read())


def _artifact_id(api: str, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts()
    return str(next(a.latest_id for a in latest if a.key == key))


def test_flow_run_and_artifacts_pages_in_chromium(chromium, tmp_path):
    out = OUTPUT / "ui"
    home = tmp_path / "home"
    env = _env(home)
    up = _cli(["local", "up", "--json"], env)
    assert up.returncode == 0, up.stdout + up.stderr
    api = json.loads(up.stdout)["prefect_api_url"]
    browser = None
    try:
        spec = yaml.safe_load(DEFAULT_SPEC.read_text())
        spec["name"] = "ui-heat"
        spec["kernel"]["parameters"] = {"nx": 64, "ny": 48, "steps": 40, "alpha": 0.2}
        spec_path = tmp_path / "ui-heat.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        run = run_cli(["run", "--spec", str(spec_path), "--json"],
                      {**env, "PREFECT_API_URL": api}, tmp_path, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout)
        flow_run_id, flow_run_name, state = _latest_flow_run(api, "hpc-pipeline")
        assert state == "Completed"

        base = api.removesuffix("/api")
        browser = Browser()
        browser.goto(f"{base}/runs/flow-run/{flow_run_id}")
        browser.wait_for(f"document.body.innerText.includes({json.dumps(flow_run_name)}) && "
                         "document.body.innerText.includes('Completed')", timeout=90)
        browser.screenshot(out / "flow-run.png")
        # The task runs tab lists every stage's task run, each Completed.
        browser.wait_for("""(() => { const tab = [...document.querySelectorAll(
            'button, [role=tab], a, li')].find(e => e.innerText.trim().startsWith('Task Runs'));
            if (tab) { tab.click(); return true } return false })()""", timeout=60)
        text = browser.wait_for(
            "(t => ['provision', 'stage_in', 'mpi_run', 'publish', 'consume'].every("
            "s => t.includes(s + '-')) && t)(document.body.innerText)", timeout=90)
        assert "Completed" in text
        browser.screenshot(out / "flow-run-task-runs.png")

        # The key's page: the spec's history of summaries, this run's on top.
        browser.goto(f"{base}/artifacts/key/ui-heat-summary")
        browser.wait_for(f"document.body.innerText.includes({json.dumps(summary['run_id'])})",
                         timeout=90)
        browser.screenshot(out / "artifact-summary-history.png")
        browser.goto(f"{base}/artifacts/artifact/{_artifact_id(api, 'ui-heat-summary')}")
        text = browser.wait_for(
            f"(t => t.includes({json.dumps(summary['result_sha256'])}) && t)"
            "(document.body.innerText)", timeout=90)
        assert summary["run_id"] in text and "mpi_run" in text
        browser.screenshot(out / "artifact-summary.png")

        browser.goto(f"{base}/artifacts/artifact/{_artifact_id(api, 'ui-heat-field')}")
        size = browser.wait_for(
            "(() => { const i = [...document.images].find(i => i.src.startsWith("
            "'data:image/png') && i.complete && i.naturalWidth > 0); "
            "return i && [i.naturalWidth, i.naturalHeight, i.width] })()", timeout=90)
        assert size[:2] == [600, 500] and size[2] > 100  # shown, not a collapsed box
        browser.screenshot(out / "artifact-field.png")
        for name in ("flow-run", "flow-run-task-runs", "artifact-summary-history",
                 "artifact-summary", "artifact-field"):
            assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        if browser is not None:
            browser.close()
        down = _cli(["local", "down", "--json"], env)
    assert down.returncode == 0, down.stderr
