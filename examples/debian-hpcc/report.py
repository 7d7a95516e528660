"""Pick HPC Challenge's headline numbers out of ``hpccoutf.txt``; fail unless it succeeded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("HPL_Tflops", "StarDGEMM_Gflops", "StarSTREAM_Triad", "PTRANS_GBs",
        "MPIRandomAccess_GUPs", "CommWorldProcs", "Success")


def main() -> None:
    src, dest = Path(sys.argv[1]), Path(sys.argv[2])
    values = {}
    for line in src.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key in KEYS:
            values[key] = float(value) if key != "CommWorldProcs" else int(value)
    if values.get("Success") != 1:
        raise SystemExit(f"report: HPC Challenge did not report Success=1 in {src}")
    dest.write_text(json.dumps(values, indent=2) + "\n")
    print("report: " + ", ".join(f"{k}={v}" for k, v in values.items()))


if __name__ == "__main__":
    main()
