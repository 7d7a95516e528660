"""Can AWS be reached as configured? Asked before anything starts, answered in one line.

botocore reports a malformed region, an endpoint nobody listens on, or missing credentials
only when the first call is made, after retries, as an exception with a traceback. Commands
ask these questions first and print the answer as the error, naming the setting to fix. The
same wording is used for botocore errors that happen later anyway (``one_line``).
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    InvalidRegionError,
    NoCredentialsError,
)
from botocore.utils import validate_region_name

from infra.aws.clients import AwsConfigError

CONNECT_TIMEOUT_S = 3.0


def check_region(region: str, *, field: str = "region") -> None:
    """Refuse a region botocore would refuse (a template placeholder, spaces, ...)."""
    try:
        validate_region_name(region)
    except InvalidRegionError:
        raise AwsConfigError(f"{field}: {region!r} is not an AWS region name "
                             "(like us-east-1)") from None


def check_endpoint(url: str, *, name: str = "AWS_ENDPOINT_URL",
                   timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse an endpoint URL that is malformed or where nothing accepts a connection."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise AwsConfigError(f"{name} {url!r} is not an http(s) URL "
                             "(like http://127.0.0.1:5000)")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise AwsConfigError(f"{name} {url!r} has an invalid port") from None
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise AwsConfigError(f"{name} {url} cannot be reached ({reason}): start the "
                             f"endpoint, or unset {name}") from None


def one_line(e: BaseException) -> str:
    """A botocore error as one line that names what failed (no traceback, no retries)."""
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        op = getattr(e, "operation_name", "") or "the call"
        return f"{op} failed: {err.get('Code', '?')}: {err.get('Message') or 'no message'}"
    if isinstance(e, EndpointConnectionError):
        return f"cannot connect to {e.kwargs.get('endpoint_url', 'the AWS endpoint')}"
    if isinstance(e, NoCredentialsError):
        return ("no AWS credentials were found (aws configure / AWS_PROFILE / an instance "
                "role)")
    # botocore's own texts span lines (parameter validation lists each problem): join them.
    text = " ".join(str(e).split())
    return text if isinstance(e, BotoCoreError) else f"{type(e).__name__}: {text}"
