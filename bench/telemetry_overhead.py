"""What per-step telemetry costs the heat kernel: the same run with and without it.

1. End to end: 2 ranks of ``mpi_jobs.heat``, runs interleaved (off, kinesis, apigateway, off,
   ...) after one warm-up run that fills the numba cache, best of ``--repeat`` each, on the
   embedded endpoint (a moto server started here). The figure is the kernel's own
   ``wall_seconds`` (start to manifest, so it includes the reporter's final flush). The
   ``endpoint-down`` mode points the ranks at a closed port: the client's cost alone, since
   the embedded endpoint here runs on the ranks' own cores (on AWS it does not).
2. Per call: what ``StepReporter.step`` costs the time-step loop, in-process, with a live
   Kinesis reporter, for the default sampling (a record at most every 0.2 s) and for a
   record every step; set against heat's own seconds per step from (1) this gives the
   overhead with far less noise than (1) on a shared machine.
Goal: telemetry <= 2% slower.

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


def _cpu(server: MotoServer) -> float:
    """CPU seconds the embedded endpoint has used (it shares the ranks' cores here)."""
    import psutil

    assert server.proc is not None
    times = psutil.Process(server.proc.pid).cpu_times()
    return float(times.user + times.system)


def _closed() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _small(tmp: Path) -> Path:
    path = tmp / "small.npy"
    np.save(path, np.zeros((64, 64)))
    return path


def _per_call(aws: AwsTarget, env: dict[str, str], heat_step: float) -> dict[str, Any]:
    """Seconds per ``StepReporter.step`` call with a live reporter, per sampling setting."""
    import time

    from mpi_jobs.telemetry import Reporter, StepReporter

    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    out = {}
    for name, min_seconds in (("default (<= 1 record / 0.2 s)", 0.2), ("every step", 0.0)):
        rep = Reporter(f"bench-call-{min_seconds}", 0, stream=env["CLUSTERFLOW_TELEMETRY_STREAM"],
                       endpoint_url=aws.endpoint_url, region=aws.region)
        steps = StepReporter(rep, "bench", 1000, min_seconds=min_seconds)
        calls = 20_000
        t0 = time.perf_counter()
        for i in range(1, calls + 1):
            steps.step(i, 1e-6)
        seconds = (time.perf_counter() - t0) / calls
        counts = steps.close()
        out[name] = {"seconds": seconds, "pct_of_heat_step": 100 * seconds / heat_step,
                     "records": counts["queued"], "dropped": counts["dropped"]}
    return out


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
        # The client's own cost without the endpoint's: the same API mode at a closed port
        # (everything is dropped), since here the endpoint shares the ranks' cores.
        envs["endpoint-down"] = {**envs["apigateway"],
                                 "CLUSTERFLOW_TELEMETRY_URL": f"http://127.0.0.1:{_closed()}"}
        best: dict[str, dict[str, Any]] = {}
        base = dict(os.environ)
        os.environ["NUMBA_CACHE_DIR"] = str(tmp / "numba")
        run_kernel("heat", a.ranks, ["--nx", "64", "--ny", "64", "--steps", "2", "--alpha",
                                     "0.2", "--in", str(_small(tmp)), "--out", str(tmp / "w")])
        base = dict(os.environ)
        for i in range(a.repeat):
            for mode, env in envs.items():
                os.environ.clear()
                os.environ.update({**base, **env})
                out = tmp / f"out-{mode}-{i}"
                cpu0 = _cpu(server)
                wall, manifest = run_kernel("heat", a.ranks, [
                    "--nx", str(a.n), "--ny", str(a.n), "--steps", str(a.steps),
                    "--alpha", "0.2", "--in", str(tmp / "u0.npy"), "--out", str(out)])
                row = {"kernel_wall_s": manifest["wall_seconds"], "launcher_wall_s": wall,
                       "rank_seconds_max": max(manifest["rank_seconds"]),
                       "endpoint_cpu_s": _cpu(server) - cpu0,
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
                  f"endpoint {row['endpoint_cpu_s']:.2f} cpu-s  "
                  f"{(row['telemetry'] or {}).get('sent', '-')} sent "
                  f"{(row['telemetry'] or {}).get('dropped', '-')} dropped")
        per_step = best["off"]["rank_seconds_max"] / a.steps
        results["per_call"] = _per_call(aws, envs["kinesis"], per_step)
        for name, row in results["per_call"].items():
            print(f"per call ({name}): {row['seconds'] * 1e6:.2f} us = "
                  f"{row['pct_of_heat_step']:.3f}% of a heat step ({per_step * 1e3:.3f} ms)")
    finally:
        server.stop()
    print(write_results("telemetry_overhead", results))


if __name__ == "__main__":
    main()
