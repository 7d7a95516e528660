"""Compare the heat fields of every sweep point: a CSV table and a picture.

Run by the sweep's analysis step as ``python analyse.py FIELDS_DIR --out OUT``; FIELDS_DIR
holds one folder per point (``alpha=0.1,nx=64,ny=64/field.npy``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def parse_label(label: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in label.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("fields", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    points = sorted(p for p in args.fields.iterdir() if (p / "field.npy").exists())
    if not points:
        raise SystemExit(f"analyse: no field.npy under {args.fields}")
    rows = []
    for p in points:
        field = np.load(p / "field.npy")
        rows.append({**parse_label(p.name), "shape": "x".join(map(str, field.shape)),
                     "total": float(field.sum()), "max": float(field.max()),
                     "std": float(field.std())})
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, axes = plt.subplots(1, len(points), figsize=(2.6 * len(points), 2.8), squeeze=False)
    for ax, p, row in zip(axes[0], points, rows, strict=True):
        ax.imshow(np.load(p / "field.npy"), cmap="inferno")
        ax.set_title(f"alpha={row['alpha']}\n{row['shape']}, max {row['max']:.2f}",
                     fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out / "comparison.png", dpi=80)
    print(f"analyse: compared {len(rows)} points -> {args.out / 'comparison.csv'}")


if __name__ == "__main__":
    main()
