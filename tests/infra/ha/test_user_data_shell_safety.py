"""Issue 13, class 1, for the head node's EC2 user data (bash run as root at boot).

Config values are refused when they hold control characters or shell syntax; what is
embedded travels inside quoted heredocs as JSON, so it stays data even if validation was
bypassed. The user data is executed here with its paths moved into a temporary directory.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from infra.backends.shell_safety import UnsafeValue
from infra.ha.config import HaConfig, HaConfigError, SharedVolume, parse_ha_config
from infra.ha.user_data import UserDataError, boot_settings, render_user_data


@pytest.mark.parametrize("raw,field", [
    ({"cluster": "demo\ntouch /tmp/pwned"}, "cluster"),
    ({"cluster": "demo$(id)"}, "cluster"),
    ({"shared_volume": {"mount_point": "/shared $(touch /tmp/pwned)"}},
     "shared_volume.mount_point"),
    ({"shared_volume": {"mount_point": "/shared\n"}}, "shared_volume.mount_point"),
    ({"image_parameter": "/aws/service/x\ntouch /tmp/pwned"}, "image_parameter"),
    ({"instance_type": "t3.medium\r"}, "instance_type"),
    ({"subnet_ids": ["subnet-1\n", "subnet-2"]}, "subnet_ids"),
])
def test_hostile_ha_values_are_refused_naming_the_field(raw: dict, field: str) -> None:
    with pytest.raises(HaConfigError, match=rf"(^|; ){field}: "):
        parse_ha_config({"cluster": "demo", **raw})


def _run_user_data(text: str, root: Path) -> subprocess.CompletedProcess[str]:
    """Run the user data with its install paths under ``root`` and no boot script run."""
    text = (text.replace("/opt/clusterflow", str(root / "opt"))
            .replace("/var/lib/cloud/scripts/per-boot", str(root / "per-boot"))
            .replace("\nexec ", "\n: "))
    stub = "python3() { return 0; }\ndnf() { return 0; }\n"
    return subprocess.run(["bash", "-c", stub + text], capture_output=True, text=True,
                          timeout=30)


def test_embedded_values_stay_data_even_past_validation(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    volume = SharedVolume.model_construct(
        size_gib=16, volume_type="gp3", device="/dev/sdf",
        mount_point=f"/x\n}}\ntouch {marker}\n$(touch {marker})'`touch {marker}`")
    cfg = HaConfig(cluster="demo").model_copy(update={"shared_volume": volume})
    ended = volume.model_copy(update={"mount_point": "/x\nCLUSTERFLOW_HEAD_SETTINGS\nid"})
    with pytest.raises(UserDataError, match="heredoc marker"):
        render_user_data(cfg.model_copy(update={"shared_volume": ended}))
    proc = _run_user_data(render_user_data(cfg), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    written = json.loads((tmp_path / "opt" / "head_boot.json").read_text())
    assert written == boot_settings(cfg)


def test_the_comment_line_refuses_a_cluster_name_with_a_newline(tmp_path: Path) -> None:
    cfg = HaConfig.model_construct(**{**dict(HaConfig(cluster="demo")),
                                      "cluster": f"demo\ntouch {tmp_path / 'pwned'}"})
    with pytest.raises(UnsafeValue, match="cluster"):
        render_user_data(cfg)
