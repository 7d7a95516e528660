"""The job-side half of FSx staging: run the ranks, then hand their results to the export.

Runs on the cluster inside the batch script (``python -m infra.staging.fsx_job --out OUT
--export EXPORT -- srun ...``), so it uses the standard library only. After the command
succeeds it moves every file the kernel's ``manifest.json`` lists from ``OUT`` (the run
directory, which no data repository association exports) into ``EXPORT`` (under the
association that exports to the results prefix) and hashes each file *as it lies on the file
system*, refusing a file whose bytes are not the manifest's. It writes both into
``EXPORT/clusterflow-sums.json``; ``manifest.json`` itself never enters ``EXPORT``.

A step of a ``steps:`` run (``--step``) has no manifest to go by: its outputs are the files
the step's globs (``--glob``, none: every file) name under ``OUT``, chosen by the same code
as when the flow sees the folder (``infra.staging.outputs``), and a kernel's own
``manifest.json`` is carried in the sums file. ``--link LINK TARGET`` makes the links the
step reads its upstream outputs and file inputs through before the command starts (only
the cluster sees the file system, so only it can make them), and the folder of the
interpreter running this leads the command's ``PATH``.

Why: the manifest's arrival in S3 is the "results ready" event. Had the kernel written it
under the exported path, an ``AutoExportPolicy`` (or the export task) would publish it before
anyone had checked the exported bytes. The flow instead exports ``EXPORT``, reads the sums
file back from S3, verifies every result there, and only then uploads ``manifest.json``.
The moves are renames on one Lustre file system (no copy) when ``OUT`` and ``EXPORT`` are on
the same mount.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from infra.staging.outputs import collect
from infra.staging.outputs import sha256_of as _sha256

SUMS = "clusterflow-sums.json"
STEP_RECORDS = ("step.json", "manifest.json")  # about the outputs, never outputs


def _exportable(name: str) -> None:
    if name.startswith("/") or ".." in Path(name).parts or name == SUMS:
        raise SystemExit(f"fsx_job: output {name!r} cannot be exported")


def _write_sums(export_dir: Path, record: dict[str, object]) -> None:
    tmp = export_dir / f".{SUMS}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, export_dir / SUMS)


def hand_over(out_dir: Path, export_dir: Path) -> dict[str, object]:
    """Move the manifest's files into ``export_dir``, hash them there, write the sums file."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    export_dir.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    for entry in manifest["files"]:
        name = entry["name"]
        _exportable(name)
        dest = export_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out_dir / name), str(dest))
        sums[name] = _sha256(dest)
        if sums[name] != entry["sha256"]:
            raise SystemExit(f"fsx_job: {dest} has sha256 {sums[name]}, not the manifest's "
                             f"{entry['sha256']}: the file changed after the kernel wrote it")
    record = {"manifest": manifest, "sha256": sums}
    _write_sums(export_dir, record)
    return record


def hand_over_step(out_dir: Path, export_dir: Path, globs: list[str]) -> dict[str, object]:
    """A step's outputs (its globs, default all) moved into ``export_dir`` and hashed there;
    a kernel's ``manifest.json`` goes into the sums file and must agree with the bytes."""
    files = collect(out_dir, globs, skip=STEP_RECORDS)
    own = out_dir / "manifest.json"
    kernel_manifest = None
    if own.is_file():
        try:
            kernel_manifest = json.loads(own.read_text())
        except ValueError:
            kernel_manifest = None  # a command's own file of that name: not a kernel's
    claimed = {f["name"]: f.get("sha256") for f in (kernel_manifest or {}).get("files", [])
               if isinstance(f, dict)} if isinstance(kernel_manifest, dict) else {}
    export_dir.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    for f in files:
        name = str(f["name"])
        _exportable(name)
        dest = export_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out_dir / name), str(dest))
        sums[name] = _sha256(dest)
        if sums[name] != f["sha256"] or claimed.get(name, sums[name]) != sums[name]:
            raise SystemExit(f"fsx_job: {dest} has sha256 {sums[name]}, not the one it had "
                             "when the step ended: the file changed after it was written")
    record = {"files": files, "sha256": sums, "kernel_manifest": kernel_manifest}
    _write_sums(export_dir, record)
    return record


def make_links(out_dir: Path, links: list[list[str]]) -> None:
    """The step's folder and the links it reads through (kept when they exist: a retry or
    a requeued job runs this again)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for link, target in links:
        path = Path(link)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_symlink() and not path.exists():
            path.symlink_to(target)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.staging.fsx_job")
    ap.add_argument("--out", type=Path, required=True, help="where the kernel writes")
    ap.add_argument("--export", type=Path, required=True, help="the exported results dir")
    ap.add_argument("--step", action="store_true",
                    help="a step's outputs by --glob (default: every file), not a manifest")
    ap.add_argument("--glob", action="append", default=[], help="a step's output glob")
    ap.add_argument("--link", nargs=2, action="append", default=[],
                    metavar=("LINK", "TARGET"), help="a link to make before the command")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the ranks' command")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the ranks' command after --")
    env = None
    if args.step:
        make_links(args.out, args.link)
        # `python` (and the launcher beside it) in a step's command is the interpreter that
        # runs this on the cluster, as the venv's is where clusterflow runs the steps itself.
        env = {**os.environ, "PATH": os.pathsep.join(
            p for p in (os.path.dirname(sys.executable), os.environ.get("PATH")) if p)}
    rc = subprocess.run(command, check=False, env=env).returncode
    if rc != 0:
        return rc
    record = (hand_over_step(args.out, args.export, args.glob) if args.step
              else hand_over(args.out, args.export))
    print(f"fsx_job: {len(record['sha256'])} result(s) in {args.export} for export, "
          f"sums in {SUMS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
