"""The job-side hand-over to the export, and where a config puts a run's data on FSx."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from infra.staging.fsx_job import SUMS, main
from infra.staging.fsx_layout import fsx_layout, staging_problem

REPO = Path(__file__).resolve().parents[3]


def _kernel_output(out: Path, files: dict[str, bytes]) -> None:
    out.mkdir(parents=True)
    for name, body in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(body)
    (out / "manifest.json").write_text(json.dumps({"files": [
        {"name": n, "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()],
        "ranks": 2}))


def test_after_the_ranks_the_results_move_to_the_export_dir_with_their_sums(tmp_path):
    out, export = tmp_path / "run" / "out", tmp_path / "results" / "runs" / "r1"
    _kernel_output(out, {"field.npy": b"abc", "sub/hist.tsv": b"1\t2\n"})
    assert main(["--out", str(out), "--export", str(export), "--", sys.executable, "-c",
                 "print('ranks ran')"]) == 0
    assert sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()) \
        == [SUMS, "field.npy", "sub/hist.tsv"]  # no manifest.json where the export looks
    record = json.loads((export / SUMS).read_text())
    assert record["sha256"] == {"field.npy": hashlib.sha256(b"abc").hexdigest(),
                                "sub/hist.tsv": hashlib.sha256(b"1\t2\n").hexdigest()}
    assert record["manifest"]["ranks"] == 2 and (out / "manifest.json").exists()


def test_a_failed_command_hands_nothing_over_and_keeps_its_exit_code(tmp_path):
    out, export = tmp_path / "out", tmp_path / "export"
    _kernel_output(out, {"field.npy": b"abc"})
    assert main(["--out", str(out), "--export", str(export), "--", sys.executable, "-c",
                 "raise SystemExit(7)"]) == 7
    assert not export.exists()


def test_bytes_that_changed_after_the_manifest_fail_the_job(tmp_path):
    out, export = tmp_path / "out", tmp_path / "export"
    _kernel_output(out, {"field.npy": b"abc"})
    (out / "field.npy").write_bytes(b"abd")
    with pytest.raises(SystemExit, match="field.npy has sha256 .* not the manifest's"):
        main(["--out", str(out), "--export", str(export), "--", "true"])
    assert not (export / SUMS).exists()


def test_layouts_of_the_shipped_configs():
    od = yaml.safe_load((REPO / "cluster_configs/efa-ondemand-us-east-2.yaml").read_text())
    spot = yaml.safe_load((REPO / "cluster_configs/efa-spot-us-east-1.yaml").read_text())
    common = {"input_bucket": "clusterflow-demo-inputs", "results_bucket":
              "clusterflow-demo-results", "results_prefix": "runs/",
              "remote_root": "/fsx/clusterflow"}
    # PERSISTENT_2 with DRAs: results are written where the association exports them
    assert staging_problem(od, input_keys=["inputs/a.npy"], **common) is None
    assert fsx_layout(od).results_dir("clusterflow-demo-results", "runs/r1/",
                                      "/fsx/clusterflow") == ("/results/runs/r1", False)
    # SCRATCH_2: the ExportPath takes them, the flow copies them to the results prefix
    assert staging_problem(spot, input_keys=["inputs/a.npy"], **common) is None
    assert fsx_layout(spot).results_dir("clusterflow-demo-results", "runs/r1/",
                                        "/fsx/clusterflow") == (
        "/clusterflow/export/runs/r1", True)
    assert "is under none of its FSx links" in staging_problem(
        spot, input_keys=["elsewhere/a.npy"], **common)
    assert "not under the FSx mount /fsx" in staging_problem(
        od, input_keys=["inputs/a.npy"], **{**common, "remote_root": "/shared/cf"})
    no_fsx = {**od, "SharedStorage": od["SharedStorage"][1:]}
    assert "no FSx for Lustre storage linked to S3" in staging_problem(
        no_fsx, input_keys=["inputs/a.npy"], **common)
    existing = {**od, "SharedStorage": [{"Name": "fsx", "MountDir": "/fsx", "StorageType":
                                         "FsxLustre", "FsxLustreSettings": {
                                             "FileSystemId": "fs-0123456789abcdef0"}}]}
    assert "an existing file system (FileSystemId)" in staging_problem(
        existing, input_keys=["inputs/a.npy"], **common)


def test_a_step_links_its_inputs_then_hands_over_the_outputs_its_globs_name(tmp_path):
    """--step: links made before the command, outputs by glob moved and summed; links, the
    kernel's manifest.json and unnamed files stay behind."""
    upstream = tmp_path / "results" / "runs" / "r1" / "sim" / "alpha=0.1"
    upstream.mkdir(parents=True)
    (upstream / "field.npy").write_bytes(b"field")
    work = tmp_path / "run" / "total"
    out, export = work / "out", tmp_path / "results" / "runs" / "r1" / "total"
    link = work / "in" / "fields" / "alpha=0.1" / "field.npy"
    code = ("import pathlib, sys; src = pathlib.Path(sys.argv[1]).read_bytes(); "
            "pathlib.Path('total.txt').write_bytes(src + b'!'); "
            "pathlib.Path('scratch.log').write_text('x'); "
            "pathlib.Path('manifest.json').write_text('{\"files\": []}')")
    argv = ["--step", "--out", str(out), "--export", str(export), "--glob", "*.txt",
            "--link", str(link), str(upstream / "field.npy"),
            "--link", str(out / "field.npy"), str(upstream / "field.npy"),
            "--", "env", "-C", str(out), sys.executable, "-c", code, str(link)]
    assert main(argv) == 0
    assert link.is_symlink() and (out / "field.npy").is_symlink()
    assert sorted(p.name for p in export.iterdir()) == [SUMS, "total.txt"]
    record = json.loads((export / SUMS).read_text())
    sha = hashlib.sha256(b"field!").hexdigest()
    assert record["sha256"] == {"total.txt": sha}
    assert record["files"] == [{"name": "total.txt", "sha256": sha, "bytes": 6}]
    assert record["kernel_manifest"] == {"files": []}
    assert (out / "scratch.log").exists() and (out / "manifest.json").exists()
    assert main(argv) == 0  # a retry or requeue runs it again: the links are kept


def test_a_failed_step_command_hands_nothing_over(tmp_path):
    out, export = tmp_path / "out", tmp_path / "export"
    assert main(["--step", "--out", str(out), "--export", str(export), "--", "env", "-C",
                 str(out), sys.executable, "-c", "open('x.txt', 'w'); raise SystemExit(3)"]) == 3
    assert (out / "x.txt").exists() and not export.exists()
