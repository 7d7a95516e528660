"""Credentials for ``aws: real`` are looked for offline, where the standard chain looks."""

from __future__ import annotations

import os

from infra.aws.credentials import real_aws_problem


def test_credentials_are_found_offline_where_they_are(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-file"
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert "none were found" in real_aws_problem()
    monkeypatch.setenv("AWS_PROFILE", "nobody")
    assert "profile 'nobody' (AWS_PROFILE) is not in" in real_aws_problem()
    monkeypatch.delenv("AWS_PROFILE")
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = x\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    assert real_aws_problem() is None
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example")
    assert real_aws_problem() is None
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # your own endpoint
    assert real_aws_problem() is None
