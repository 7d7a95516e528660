"""The head's user data and boot script as the instance runs them, and the HA config model."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.aws.clients import AwsTarget
from infra.ha import head_boot as hb
from infra.ha.config import HaConfigError, load_ha_config, parse_ha_config
from infra.ha.user_data import (
    HEAD_BOOT,
    USER_DATA_LIMIT,
    boot_settings,
    embedded_script,
    render_user_data,
)

TOKEN = "t0k3n"


class FakeImds:
    """IMDSv2 on 127.0.0.1: a token first, then metadata only for requests that carry it."""

    def __init__(self, meta: dict[str, str]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                ok = self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds")
                self._send(200 if ok else 400, TOKEN if ok else "")

            def do_GET(self) -> None:  # noqa: N802
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    return self._send(401, "")
                key = self.path.removeprefix("/latest/meta-data/")
                outer.requests.append(key)
                self._send(200, meta[key]) if key in meta else self._send(404, "")

            def _send(self, code: int, body: str) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @classmethod
    @contextlib.contextmanager
    def serving(cls, meta: dict[str, str]) -> Iterator[FakeImds]:
        imds = cls(meta)
        thread = threading.Thread(target=imds.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield imds
        finally:
            imds.server.shutdown()
            imds.server.server_close()


def test_user_data_carries_the_boot_script_verbatim() -> None:
    cfg = parse_ha_config({"cluster": "demo", "design": "asg"})
    text = render_user_data(cfg)
    assert len(text.encode()) <= USER_DATA_LIMIT
    assert embedded_script(text) == HEAD_BOOT.read_text()
    settings = text.split("<<'CLUSTERFLOW_HEAD_SETTINGS'\n", 1)[1].split(
        "\nCLUSTERFLOW_HEAD_SETTINGS\n", 1)[0]
    assert json.loads(settings) == boot_settings(cfg)
    # Valid bash, and the per-boot script it installs is valid bash too.
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    per_boot = text.split("<<'CLUSTERFLOW_PER_BOOT'\n", 1)[1].split("CLUSTERFLOW_PER_BOOT\n")[0]
    subprocess.run(["bash", "-n"], input=per_boot, text=True, check=True)
    assert "/var/lib/cloud/scripts/per-boot/" in text  # runs on every boot, not once


def test_boot_script_runs_standalone_with_imds(aws: AwsTarget, tmp_path: Path) -> None:
    """The script exactly as the user data writes it, as a separate process, with only boto3,
    IMDSv2 and the endpoint: it claims the tagged EIP and attaches a volume in its AZ."""
    cluster = f"boot-{uuid.uuid4().hex[:8]}"
    cfg = parse_ha_config({"cluster": cluster, "design": "asg"})
    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24",
                               AvailabilityZone="us-east-1b")["Subnet"]["SubnetId"]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    tags = {hb.TAG_CLUSTER: cluster, hb.TAG_ROLE: hb.ROLE_HEAD}
    iid = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, SubnetId=subnet,
                            TagSpecifications=hb.tag_spec("instance", tags),
                            )["Instances"][0]["InstanceId"]
    # Another cluster's EIP must stay where it is.
    ec2.allocate_address(Domain="vpc", TagSpecifications=hb.tag_spec(
        "elastic-ip", {hb.TAG_CLUSTER: "someone-else", hb.TAG_ROLE: hb.ROLE_EIP}))
    mine = ec2.allocate_address(Domain="vpc", TagSpecifications=hb.tag_spec(
        "elastic-ip", {hb.TAG_CLUSTER: cluster, hb.TAG_ROLE: hb.ROLE_EIP}))

    script = tmp_path / "head_boot.py"
    script.write_text(embedded_script(render_user_data(cfg)))
    settings = tmp_path / "head_boot.json"
    settings.write_text(json.dumps(boot_settings(cfg)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=aws.endpoint_url or "", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", PYTHONPATH="")
    meta = {"instance-id": iid, "placement/availability-zone": "us-east-1b",
            "placement/region": "us-east-1"}
    with FakeImds.serving(meta) as imds:
        env["CLUSTERFLOW_IMDS_URL"] = imds.url
        proc = subprocess.run([sys.executable, "-I", str(script), "--settings", str(settings),
                               "--no-mount"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert set(imds.requests) == set(meta)
    out = json.loads(proc.stdout)
    assert out["active"] and out["eip"]["allocation_id"] == mine["AllocationId"]
    addr = ec2.describe_addresses(AllocationIds=[mine["AllocationId"]])["Addresses"][0]
    assert addr["InstanceId"] == iid
    vol = hb.attached_shared_volume(ec2, cluster, iid)
    assert vol is not None and vol["AvailabilityZone"] == "us-east-1b"
    assert vol["Size"] == cfg.shared_volume.size_gib and out["volume"]["snapshot_id"] is None


def test_ha_config_refuses_what_cannot_work(tmp_path: Path) -> None:
    cfg = parse_ha_config({"cluster": "c1"})
    assert cfg.design == "standby" and len(cfg.availability_zones) == 2
    for raw, msg in [
        ({"cluster": "c1", "availability_zones": ["us-east-1a"]}, "availability_zones"),
        ({"cluster": "c1", "availability_zones": ["us-east-1a", "us-west-2b"]}, "not in region"),
        ({"cluster": "c1", "design": "pacemaker"}, "design"),
        ({"cluster": "C1"}, "cluster"),
        ({"cluster": "c1", "subnet_ids": ["subnet-1"]}, "one subnet per availability zone"),
        ({"cluster": "c1", "shared_volume": {"device": "/dev/sda1"}}, "shared_volume.device"),
        ({"cluster": "c1", "extra": 1}, "extra"),
    ]:
        with pytest.raises(HaConfigError, match=msg):
            parse_ha_config(raw)
    path = tmp_path / "ha.yaml"
    path.write_text("cluster: c2\ndesign: asg\nshared_volume: {size_gib: 64}\n")
    loaded = load_ha_config(path, region=None)
    assert (loaded.design, loaded.shared_volume.size_gib) == ("asg", 64)
