"""What per-step telemetry costs the heat kernel: the same run with and without it.

2 ranks of ``mpi_jobs.heat``, runs interleaved (off, kinesis, apigateway, off, ...), best of
``--repeat`` each, on the embedded endpoint (a moto server started here). The figure is the
kernel's own ``wall_seconds`` (start to manifest, so it includes the reporter's final flush),
and the launcher's wall time. Goal: telemetry <= 2% slower.

    .venv/bin/python bench/telemetry_overhead.py                 # 2 ranks, 1024x1024, 2000 steps
    .venv/bin/python bench/telemetry_overhead.py --n 256 --steps 300 --repeat 2   # smoke

Writes ``bench/results/telemetry_overhead.json``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from kernels_common import machine, run_kernel, write_results

from infra.aws.clients import AwsTarget
from infra.aws.embedded import MotoServer
from infra.telemetry.job import telemetry_env
from infra.telemetry.provision import TelemetryConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tele-bench-"))
    np.save(tmp / "u0.npy", np.random.default_rng(1).random((a.n, a.n)))
    server = MotoServer(tmp / "moto.log").start()
    results: dict[str, Any] = {"machine": machine(), "n": a.n, "steps": a.steps,
                               "ranks": a.ranks, "modes": {}}
    try:
        aws = AwsTarget(region="us-east-1", endpoint_url=server.url, embedded=True)
        cfg = TelemetryConfig(bucket="tele-bench", buffer_seconds=5)
        envs = {"off": {}}
        for mode in ("kinesis", "apigateway"):
            envs[mode] = telemetry_env(aws, f"bench-{mode}", mode=mode, cfg=cfg)
        best: dict[str, dict[str, Any]] = {}
        base = dict(os.environ)
        for i in range(a.repeat):
            for mode, env in envs.items():
                os.environ.clear()
                os.environ.update({**base, **env})
                out = tmp / f"out-{mode}-{i}"
                wall, manifest = run_kernel("heat", a.ranks, [
                    "--nx", str(a.n), "--ny", str(a.n), "--steps", str(a.steps),
                    "--alpha", "0.2", "--in", str(tmp / "u0.npy"), "--out", str(out)])
                row = {"kernel_wall_s": manifest["wall_seconds"], "launcher_wall_s": wall,
                       "telemetry": manifest.get("telemetry")}
                if mode not in best or row["kernel_wall_s"] < best[mode]["kernel_wall_s"]:
                    best[mode] = row
        os.environ.clear()
        os.environ.update(base)
        off = best["off"]["kernel_wall_s"]
        for mode, row in best.items():
            row["slower_than_off_pct"] = 100 * (row["kernel_wall_s"] / off - 1)
            results["modes"][mode] = row
            print(f"{mode:<11} kernel {row['kernel_wall_s']:.3f} s  launcher "
                  f"{row['launcher_wall_s']:.3f} s  {row['slower_than_off_pct']:+.2f}%  "
                  f"{(row['telemetry'] or {}).get('sent', '-')} sent "
                  f"{(row['telemetry'] or {}).get('dropped', '-')} dropped")
    finally:
        server.stop()
    print(write_results("telemetry_overhead", results))


if __name__ == "__main__":
    main()
