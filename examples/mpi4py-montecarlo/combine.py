"""Combine every seed's estimate (``DIR/<point>/estimate.json``) into one, by total hits."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    src, dest = Path(sys.argv[1]), Path(sys.argv[2])
    parts = [json.loads(p.read_text()) for p in sorted(src.glob("*/estimate.json"))]
    if not parts:
        raise SystemExit(f"combine: no estimate.json under {src}")
    hits = sum(p["hits"] for p in parts)
    samples = sum(p["samples"] for p in parts)
    dest.write_text(json.dumps({"pi": 4.0 * hits / samples, "samples": samples,
                                "seeds": [p["seed"] for p in parts]}) + "\n")
    print(f"combine: pi ~ {4.0 * hits / samples:.6f} from {len(parts)} seeds")


if __name__ == "__main__":
    main()
