"""Where AWS calls go: every boto3 client in clusterflow is built here.

The same code talks to real AWS or to a local endpoint; only ``endpoint_url`` differs. Real
AWS is used only when asked for explicitly (``aws: real`` in the spec or ``--aws real``), never
because credentials happen to be lying around, and the embedded endpoint is always given
throw-away credentials so a developer's real keys never reach it.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlparse

import boto3
from botocore.config import Config

AwsMode = Literal["embedded", "real"]

# moto accepts any credentials; fixed ones keep real keys away from a local endpoint.
EMBEDDED_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


class AwsConfigError(RuntimeError):
    """AWS cannot be reached as configured; the message says what to set."""


@dataclass(frozen=True)
class AwsTarget:
    """One AWS account/endpoint + region, passed to every task that talks to AWS."""

    region: str
    endpoint_url: str | None = None
    embedded: bool = False

    @property
    def label(self) -> str:
        if self.embedded:
            return f"embedded AWS (moto) at {self.endpoint_url}"
        if self.endpoint_url:
            return f"AWS endpoint {self.endpoint_url}"
        return f"AWS ({self.region})"

    def client(self, service: str) -> Any:
        return _client(self, service)


_lock = threading.Lock()
_clients: dict[tuple[AwsTarget, str], Any] = {}


def _is_local(endpoint: str) -> bool:
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _has_configured_credentials(session: boto3.session.Session) -> bool:
    """Keys in the environment or a profile, found without asking the instance metadata
    service (that probe takes seconds off EC2, for an endpoint that accepts any key)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return True
    profile = os.environ.get("AWS_PROFILE") or "default"
    return profile in session.available_profiles


_sessions: dict[str, boto3.session.Session] = {}
# botocore's data (service models, endpoint rules, partitions) loaded by ``load_data_once``
# and the AWS_DATA_PATH it was loaded under; new sessions share it while that is unchanged.
_loaded: tuple[str | None, Any] | None = None


def load_data_once(services: tuple[str, ...], region: str = "us-east-1") -> None:
    """Load botocore's data for ``services`` now, for every session made after, here or in
    a forked child (``flows.warm_runner``): a fresh process spends 0.1-0.2 s of CPU parsing
    it for a run's first four clients. Builds throw-away clients (no request is made)."""
    global _loaded
    session = boto3.session.Session(region_name=region)
    for service in services:
        session.client(service, endpoint_url="http://127.0.0.1:1", **EMBEDDED_CREDENTIALS)
    _loaded = (os.environ.get("AWS_DATA_PATH"), session._session.get_component("data_loader"))


def _session(region: str) -> boto3.session.Session:
    """One session per region, so its clients share botocore's loaded data (endpoint
    rules, partitions, retry config): a fresh session per client parsed it all again, 1.5 s
    of a run's 5 clients on a busy 2-core VM against 0.5 s shared. Only used under ``_lock``:
    sessions are not thread-safe, clients are."""
    if region not in _sessions:
        session = boto3.session.Session(region_name=region)
        if _loaded is not None and _loaded[0] == os.environ.get("AWS_DATA_PATH"):
            session._session.register_component("data_loader", _loaded[1])
        _sessions[region] = session
    return _sessions[region]


def _client(target: AwsTarget, service: str) -> Any:
    # Clients are thread-safe and costly to build (~50 ms each); sessions are not thread-safe.
    key = (target, service)
    with _lock:
        if key not in _clients:
            session = _session(target.region)
            kwargs: dict[str, Any] = {}
            if target.endpoint_url:
                kwargs["endpoint_url"] = target.endpoint_url
                if target.embedded or not _has_configured_credentials(session):
                    kwargs.update(EMBEDDED_CREDENTIALS)
            # A local endpoint answers 500 for calls it lacks; retrying those only duplicates
            # side effects (put_events), so fail fast there and retry normally on AWS.
            local = target.embedded or bool(target.endpoint_url and _is_local(target.endpoint_url))
            retries = {"mode": "standard", "total_max_attempts": 1 if local else 5}
            # Transfers run up to 16 threads on one client (infra.staging.stager); the default
            # pool of 10 connections would make them queue for sockets.
            config = Config(region_name=target.region, retries=retries, connect_timeout=5,
                            read_timeout=60, max_pool_connections=32)
            _clients[key] = session.client(service, config=config, **kwargs)
        return _clients[key]


def real_target(region: str) -> AwsTarget:
    """AWS itself (or whatever ``AWS_ENDPOINT_URL`` points at), with the standard chain."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint is None and boto3.session.Session().get_credentials() is None:
        raise AwsConfigError(
            "aws: real was requested but no AWS credentials were found; configure them "
            "(aws configure / AWS_PROFILE / instance role) or use aws: embedded"
        )
    return AwsTarget(region=region, endpoint_url=endpoint, embedded=False)
