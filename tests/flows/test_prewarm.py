"""flows.prewarm: the clients it builds are the ones the run's stages then use."""

from __future__ import annotations

import pytest

from flows import prewarm
from flows.spec import DEFAULT_SPEC, load_spec
from infra.aws import clients
from infra.aws.embedded import aws_target


def _spec(tmp_path, aws_mode="embedded"):
    return load_spec(DEFAULT_SPEC, aws=aws_mode)


def test_clients_built_ahead_are_the_ones_the_run_gets(aws, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws.endpoint_url)
    spec = _spec(tmp_path)
    prewarm.start(spec).join(timeout=120)
    with aws_target(spec.aws, spec.region) as target:  # what provision/consume use
        for service in prewarm.SERVICES:
            assert (target, service) in clients._clients  # noqa: SLF001
        built = {s: clients._clients[(target, s)] for s in prewarm.SERVICES}  # noqa: SLF001
        assert target.client("s3") is built["s3"]
        target.client("s3").list_buckets()  # a working client, on that endpoint


def test_without_a_known_endpoint_nothing_is_started(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("CLUSTERFLOW_HOME", str(tmp_path / "home"))  # no local stack recorded
    spec = _spec(tmp_path)
    assert prewarm.known_target(spec) is None
    before = dict(clients._clients)  # noqa: SLF001
    prewarm.start(spec).join(timeout=60)
    assert clients._clients == before  # noqa: SLF001
    assert not (tmp_path / "home" / "moto.json").exists()


@pytest.mark.parametrize("endpoint", [None, "http://127.0.0.1:9"])
def test_real_aws_target_matches_the_runs(tmp_path, monkeypatch, endpoint):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    else:
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    spec = _spec(tmp_path, "real")
    with aws_target(spec.aws, spec.region) as target:
        assert prewarm.known_target(spec) == target
