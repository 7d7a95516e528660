"""Issue 13, class 1, for AWS Batch: the FSx user data, the job command, the MNP entry point.

The user data is a bash script run as root at every instance's boot; the job's command is an
exec-form argv (no shell) that the entry point hands to ``mpirun`` as a list. Hostile config
values are refused by the config model; values that pass must arrive unchanged as data.
"""

from __future__ import annotations

import base64
import email
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra.backends.providers.batch import BatchMnpLauncher
from infra.backends.providers.remote import remote_argv
from infra.clusters import batch, batch_mnp_entry
from infra.clusters.batch_config import BatchMnpConfig, FsxMount, validate_batch_config
from infra.clusters.config_issues import ConfigInvalid
from tests.infra.backends.test_shell_safety import hostile

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "cluster_configs" / "batch" / "mnp-c5n-efa.yaml"


def _raw(**changes: Any) -> dict[str, Any]:
    raw = yaml.safe_load(CONFIG.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value
    return raw


def _user_data_script(cfg: BatchMnpConfig) -> str:
    doc = email.message_from_bytes(base64.b64decode(batch.fsx_user_data(cfg) or ""))
    [part] = [p for p in doc.walk() if p.get_content_type() == "text/x-shellscript"]
    return str(part.get_payload())


@pytest.mark.parametrize("changes,field", [
    ({"fsx__dns_name": "fs-1.fsx.amazonaws.com; touch /tmp/pwned"}, "fsx.dns_name"),
    ({"fsx__mount_name": "abc\ntouch /tmp/pwned"}, "fsx.mount_name"),
    ({"fsx__mount_point": "/fsx $(touch /tmp/pwned)"}, "fsx.mount_point"),
    ({"container__environment": {"A": "x\ny"}}, "container.environment"),
    ({"container__mpirun_args": ["--mca", "pml\rcm"]}, "container.mpirun_args"),
    ({"container__image": "repo/img:latest\n"}, "container.image"),
    ({"tags": {"team\n": "hpc"}}, "tags"),
])
def test_hostile_config_values_are_refused_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigInvalid) as e:
        validate_batch_config(_raw(**changes), source="mnp.yaml")
    assert any(i.path == field for i in e.value.issues), e.value.issues


def test_user_data_quotes_the_mount_even_for_values_that_skipped_validation(
        tmp_path: Path) -> None:
    cfg = validate_batch_config(_raw(), source="mnp.yaml")
    marker = tmp_path / "pwned"
    fsx = FsxMount.model_construct(dns_name=f"fs$(touch {marker})", mount_name=f"a;touch {marker}",
                                   mount_point=f"/fsx `touch {marker}`")
    script = _user_data_script(cfg.model_copy(update={"fsx": fsx}))
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    [mount] = [ln for ln in script.splitlines() if ln.startswith("mount ")]
    assert shlex.split(mount) == ["mount", "-t", "lustre", "-o", "relatime,flock",
                                  f"fs$(touch {marker})@tcp:/a;touch {marker}",
                                  f"/fsx `touch {marker}`"]
    # Executed with the commands replaced by echo, nothing but echo runs.
    stubbed = "\n".join(ln for ln in script.splitlines()[2:] if not ln.startswith("dnf"))
    proc = subprocess.run(["bash", "-c", "mkdir() { :; }; mount() { :; }\n" + stubbed],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


def test_the_shipped_user_data_mounts_the_configured_file_system() -> None:
    script = _user_data_script(validate_batch_config(_raw(), source="mnp.yaml"))
    assert "mount -t lustre -o relatime,flock fs-0123456789abcdef0.fsx.us-east-1.amazonaws.com" \
           "@tcp:/abcdefgh /fsx" in script


def test_the_job_command_reaches_mpirun_as_the_same_argv(tmp_path: Path) -> None:
    cfg = validate_batch_config(_raw(**{"container__mpirun": ["/opt/mpi dir/mpirun", "-x", "A=b c"],
                                        "container__mpirun_args": ["--mca", "x;y $(z)"]}),
                                source="mnp.yaml")
    argv = ["python3", "-m", "mpi_jobs.heat", *hostile(tmp_path / "pwned")]
    command = BatchMnpLauncher(cfg).command(4, argv)
    body = batch.node_properties(cfg)["nodeRangeProperties"][0]["container"]
    assert isinstance(body["command"], list)  # exec form: Batch starts no shell
    args = batch_mnp_entry.parse(command[len(cfg.container.entry):])
    assert args.command == remote_argv(argv, cfg.container.python)
    assert shlex.split(args.mpirun) == ["/opt/mpi dir/mpirun", "-x", "A=b c"]
    assert args.mpirun_arg == ["--mca", "x;y $(z)"]


@pytest.mark.parametrize("line,ok", [
    ("10.0.0.2 8", True), ("fd00::1 4", True), ("10.0.0.2 8 extra", False),
    ("node;rm 8", False), ("10.0.0.2 -1", False), ("10.0.0.2 ²", False),
    ("10.0.0.2 slots=99", False), ("", False),
])
def test_the_main_node_only_accepts_address_and_slot_registrations(line: str, ok: bool) -> None:
    assert batch_mnp_entry._registration_ok(line.split()) is ok
