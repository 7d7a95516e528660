"""The job-side half of FSx staging: run the ranks, then hand their results to the export.

Runs on the cluster inside the batch script (``python -m infra.staging.fsx_job --out OUT
--export EXPORT -- srun ...``), so it uses the standard library only. After the command
succeeds it moves every file the kernel's ``manifest.json`` lists from ``OUT`` (the run
directory, which no data repository association exports) into ``EXPORT`` (under the
association that exports to the results prefix) and hashes each file *as it lies on the file
system*, refusing a file whose bytes are not the manifest's. It writes both into
``EXPORT/clusterflow-sums.json``; ``manifest.json`` itself never enters ``EXPORT``.

Why: the manifest's arrival in S3 is the "results ready" event. Had the kernel written it
under the exported path, an ``AutoExportPolicy`` (or the export task) would publish it before
anyone had checked the exported bytes. The flow instead exports ``EXPORT``, reads the sums
file back from S3, verifies every result there, and only then uploads ``manifest.json``.
The moves are renames on one Lustre file system (no copy) when ``OUT`` and ``EXPORT`` are on
the same mount.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SUMS = "clusterflow-sums.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def hand_over(out_dir: Path, export_dir: Path) -> dict[str, object]:
    """Move the manifest's files into ``export_dir``, hash them there, write the sums file."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    export_dir.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    for entry in manifest["files"]:
        name = entry["name"]
        if name.startswith("/") or ".." in Path(name).parts or name == SUMS:
            raise SystemExit(f"fsx_job: manifest entry {name!r} cannot be exported")
        dest = export_dir / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out_dir / name), str(dest))
        sums[name] = _sha256(dest)
        if sums[name] != entry["sha256"]:
            raise SystemExit(f"fsx_job: {dest} has sha256 {sums[name]}, not the manifest's "
                             f"{entry['sha256']}: the file changed after the kernel wrote it")
    record = {"manifest": manifest, "sha256": sums}
    tmp = export_dir / f".{SUMS}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, export_dir / SUMS)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra.staging.fsx_job")
    ap.add_argument("--out", type=Path, required=True, help="where the kernel writes")
    ap.add_argument("--export", type=Path, required=True, help="the exported results dir")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the ranks' command")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the ranks' command after --")
    rc = subprocess.run(command, check=False).returncode
    if rc != 0:
        return rc
    record = hand_over(args.out, args.export)
    print(f"fsx_job: {len(record['sha256'])} result(s) in {args.export} for export, "
          f"sums in {SUMS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
