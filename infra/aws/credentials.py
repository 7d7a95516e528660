"""Are there AWS credentials to use? Answered offline, before anything starts.

``aws: real`` without credentials used to be found out only inside the flow, after the Prefect
server had started (seconds, then a traceback). The standard credential chain can be walked
without a network call for every source that lives on this machine (environment, shared
credentials and config files with their profiles, SSO and assume-role profiles, whose tokens are
fetched only later, credential_process). Only the container and instance-metadata sources need
a network call; for those it is enough to know they could answer: the container's variables
are set, or this is an EC2 instance (its DMI data says so) with the metadata service not
disabled. ``infra.aws.clients.real_target`` still resolves the real credentials when the run
starts.
"""

from __future__ import annotations

import os
from pathlib import Path

_NETWORK_PROVIDERS = ("container-role", "iam-role")
_CONTAINER_VARS = ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
_DMI = Path("/sys/class/dmi/id")


def _on_ec2() -> bool:
    """True on an EC2 instance (Nitro or Xen), from DMI data only (no metadata call)."""
    for name in ("sys_vendor", "board_vendor", "bios_version"):
        try:
            text = (_DMI / name).read_text().strip().lower()
        except OSError:
            continue
        if text.startswith("amazon") or text.endswith(".amazon"):
            return True
    try:
        return Path("/sys/hypervisor/uuid").read_text().lower().startswith("ec2")
    except OSError:
        return False


def local_credentials_found(profile: str | None = None) -> bool:
    """Whether the credential chain finds credentials from sources on this machine."""
    import botocore.session

    session = botocore.session.Session(profile=profile)
    resolver = session.get_component("credential_provider")
    for name in _NETWORK_PROVIDERS:
        resolver.remove(name)
    return resolver.load_credentials() is not None


def real_aws_problem() -> str | None:
    """Why ``aws: real`` cannot work here, or None (also None when AWS_ENDPOINT_URL is set: an
    endpoint of your own is used with whatever credentials it accepts)."""
    import botocore.exceptions

    if os.environ.get("AWS_ENDPOINT_URL"):
        return None
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    try:
        if local_credentials_found(profile):
            return None
    except botocore.exceptions.ProfileNotFound:
        return (f"aws: real: the AWS profile '{profile}' (AWS_PROFILE) is not in ~/.aws/config "
                f"or ~/.aws/credentials: configure it (aws configure --profile {profile}) or "
                f"unset AWS_PROFILE")
    except botocore.exceptions.BotoCoreError as e:  # a broken config file, say
        return f"aws: real: the AWS configuration cannot be read: {e}"
    if any(os.environ.get(v) for v in _CONTAINER_VARS):
        return None
    metadata_off = os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
    if _on_ec2() and not metadata_off:
        return None
    where = f"profile '{profile}'" if profile else "the environment, ~/.aws or an instance role"
    return ("aws: real needs AWS credentials and none were found in "
            f"{where}: configure them (aws configure, AWS_PROFILE, AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY) or use aws: embedded")
