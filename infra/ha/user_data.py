"""The head node's user data: install ``head_boot.py`` and run it on every boot.

Every boot, not only the first: the standby design stops and starts the same instance, and
cloud-init runs user data once per instance, so the script is installed as a per-boot script
(and run once now, because cloud-init runs per-boot scripts before the user data on first
boot). ``head_boot.py`` is embedded verbatim; tests extract it back and compare.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from infra.backends.shell_safety import reject_control_chars
from infra.ha.config import HaConfig

HEAD_BOOT = Path(__file__).resolve().parent / "head_boot.py"
USER_DATA_LIMIT = 16384  # EC2's limit on user data before base64
SCRIPT_MARK = "CLUSTERFLOW_HEAD_BOOT_PY"
SETTINGS_MARK = "CLUSTERFLOW_HEAD_SETTINGS"


class UserDataError(ValueError):
    """The rendered user data would not be accepted by EC2."""


def boot_settings(cfg: HaConfig) -> dict[str, object]:
    v = cfg.shared_volume
    return {"cluster": cfg.cluster, "device": v.device, "size_gib": v.size_gib,
            "volume_type": v.volume_type, "mount_point": v.mount_point}


def render_user_data(cfg: HaConfig) -> str:
    # The cluster's name goes into a comment line; everything else is inside quoted heredocs.
    reject_control_chars(cfg.cluster, "cluster")
    script = HEAD_BOOT.read_text()
    settings = json.dumps(boot_settings(cfg), indent=2)
    for mark in (SCRIPT_MARK, SETTINGS_MARK):
        if mark in script or mark in settings:
            raise UserDataError(f"heredoc marker {mark} occurs in the embedded text")
    text = f"""#!/bin/bash
# clusterflow head node ({cfg.design} design, cluster {cfg.cluster}): on every boot, claim the
# cluster's Elastic IP, restore + mount the shared volume (Slurm state), then start slurmctld.
set -euo pipefail
python3 -c 'import boto3' 2>/dev/null || dnf install -y -q python3-boto3
install -d -m 0755 /opt/clusterflow /var/lib/cloud/scripts/per-boot
cat > /opt/clusterflow/head_boot.py <<'{SCRIPT_MARK}'
{script}{SCRIPT_MARK}
cat > /opt/clusterflow/head_boot.json <<'{SETTINGS_MARK}'
{settings}
{SETTINGS_MARK}
cat > /var/lib/cloud/scripts/per-boot/clusterflow-head.sh <<'CLUSTERFLOW_PER_BOOT'
#!/bin/bash
# exit 3: this is the stopped standby's first boot; it claims nothing until it is promoted.
rc=0
python3 /opt/clusterflow/head_boot.py --settings /opt/clusterflow/head_boot.json || rc=$?
if [ "$rc" -eq 3 ]; then exit 0; fi
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
if systemctl cat slurmctld >/dev/null 2>&1; then systemctl start slurmctld; fi
CLUSTERFLOW_PER_BOOT
chmod 0755 /var/lib/cloud/scripts/per-boot/clusterflow-head.sh
exec /var/lib/cloud/scripts/per-boot/clusterflow-head.sh
"""
    if len(text.encode()) > USER_DATA_LIMIT:
        raise UserDataError(f"user data is {len(text.encode())} bytes; EC2 accepts at most "
                            f"{USER_DATA_LIMIT}")
    return text


def user_data_b64(cfg: HaConfig) -> str:
    return base64.b64encode(render_user_data(cfg).encode()).decode()


def embedded_script(user_data: str) -> str:
    """The ``head_boot.py`` text a rendered user data carries (for checks)."""
    start = user_data.index(f"<<'{SCRIPT_MARK}'\n") + len(f"<<'{SCRIPT_MARK}'\n")
    return user_data[start:user_data.index(f"{SCRIPT_MARK}\n", start)]
