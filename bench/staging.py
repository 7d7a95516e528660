"""Staging benchmark: clusterflow's stager vs ``aws s3 sync`` vs ``s5cmd``, side by side.

Same data, same endpoint (one moto server from ``infra.aws.embedded``), one run:

* datasets: one big file (default 1 GiB) and many small ones (default 10,000 x 64 KiB);
* directions: up (local -> fresh prefix) and down (one shared source prefix -> fresh folder);
* clusterflow's re-stage of the unchanged small tree vs its first stage (goal: >= 20x faster);
* wall seconds, MiB/s and peak RSS of each tool's process tree (``os.wait4``).

awscli and s5cmd live in their own venvs under ``bench/`` (created on first use, gitignored),
so their dependencies never touch the project's. Results go to ``bench/results/staging.json``.

    .venv/bin/python bench/staging.py                       # full size
    .venv/bin/python bench/staging.py --big-mib 64 --small-count 500   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import venv
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from infra.aws.clients import AwsTarget  # noqa: E402
from infra.aws.embedded import MotoServer  # noqa: E402

BENCH = REPO / "bench"
TOOLS = ("clusterflow", "awscli", "s5cmd")
VENVS = {"awscli": (BENCH / ".venv-awscli", "awscli", "aws"),
         "s5cmd": (BENCH / ".venv-s5cmd", "s5cmd", "s5cmd")}


def ensure_tool(tool: str) -> Path | None:
    """The tool's executable, installing it into its own venv first if needed."""
    folder, package, exe = VENVS[tool]
    path = folder / "bin" / exe
    if path.exists():
        return path
    print(f"installing {package} into {folder.relative_to(REPO)} ...", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    r = subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "-q", package],
                       capture_output=True, text=True)
    if r.returncode != 0 or not path.exists():
        print(f"  could not install {package}: {r.stderr.strip()[-500:]}", flush=True)
        return None
    return path


def make_data(root: Path, big_mib: int, small_count: int, small_kib: int) -> None:
    big = root / "big"
    big.mkdir(parents=True)
    with (big / "one.bin").open("wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(1 << 20))
    small = root / "small"
    for i in range(small_count):
        d = small / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}.bin").write_bytes(os.urandom(small_kib << 10))


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory(threading.Thread):
    """Sum over a process tree of each process's RSS high-water mark (VmHWM), polled.

    ``getrusage``/``wait4`` cannot be used: a child forked from this (large) Python process
    inherits its RSS as the high-water mark before it execs the tool.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peaks, self.done = pid, {}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                tree = [self.pid, *(c.pid for c in psutil.Process(self.pid).children(
                    recursive=True))]
            except psutil.NoSuchProcess:
                tree = []
            for p in tree:
                self.peaks[p] = max(self.peaks.get(p, 0), _hwm_kib(p))
            self.done.wait(0.02)

    @property
    def mib(self) -> float:
        return round(sum(self.peaks.values()) / 1024, 1)


def timed(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one command: wall time and peak memory of its process tree."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errs:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=errs)
        watch = PeakMemory(proc.pid)
        watch.start()
        proc.wait()
        seconds = time.perf_counter() - t0
        watch.done.set()
        watch.join()
        out.seek(0)
        errs.seek(0)
        stdout, stderr = out.read(), errs.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {proc.returncode}: "
                           f"{stderr.decode(errors='replace')[-1500:]}")
    return {"seconds": round(seconds, 3), "peak_rss_mib": watch.mib,
            "stdout": stdout.decode(errors="replace")}


def command(tool: str, exe: Path | None, src: str, dst: str, url: str, concurrency: int,
            ) -> list[str]:
    if tool == "clusterflow":
        return [sys.executable, "-m", "infra.staging.cli", "stage", src, dst, "--json",
                "--concurrency", str(concurrency)]
    if tool == "awscli":
        return [str(exe), "--endpoint-url", url, "s3", "sync", "--only-show-errors", src, dst]
    # s5cmd: a trailing wildcard copies a prefix's contents, keeping the relative paths
    if src.startswith("s3://"):
        src = src.rstrip("/") + "/*"
    else:
        src = src.rstrip("/") + "/"
        dst = dst.rstrip("/") + "/"
    return [str(exe), "--endpoint-url", url, "sync", src, dst]


def tree_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def empty_bucket(s3: Any, bucket: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the one big file")
    ap.add_argument("--small-count", type=int, default=10_000, help="number of small files")
    ap.add_argument("--small-kib", type=int, default=64, help="size of each small file")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset")
    ap.add_argument("--datasets", default="big,small", help="comma-separated subset")
    ap.add_argument("--concurrency", type=int, default=16, help="clusterflow's files in flight")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=BENCH / "results" / "staging.json")
    args = ap.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    exes: dict[str, Path | None] = {"clusterflow": None}
    for t in tools:
        if t != "clusterflow":
            exes[t] = ensure_tool(t)
    tools = [t for t in tools if t == "clusterflow" or exes.get(t)]

    work = Path(tempfile.mkdtemp(prefix="cf-bench-", dir=args.workdir))
    server = MotoServer(work / "moto.log").start()
    results: dict[str, Any] = {
        "config": {"big_mib": args.big_mib, "small_count": args.small_count,
                   "small_kib": args.small_kib, "concurrency": args.concurrency,
                   "tools": tools, "cpus": os.cpu_count(), "endpoint": "moto server (embedded)"},
        "runs": [], "ratios": {}}
    try:
        aws = AwsTarget(region="us-east-1", endpoint_url=server.url, embedded=True)
        s3 = aws.client("s3")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
               "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.url,
               "PYTHONPATH": str(REPO)}
        data = work / "data"
        print(f"generating data in {data} ...", flush=True)
        make_data(data, args.big_mib, args.small_count, args.small_kib)

        # the shared source every tool downloads from, written by plain boto3 (neutral: S3's
        # default CRC32 checksums, multipart above 8 MiB as the SDKs do)
        s3.create_bucket(Bucket="bench-source")
        for ds in ("big", "small"):
            for p in sorted((data / ds).rglob("*")):
                if p.is_file():
                    s3.upload_file(str(p), "bench-source", f"{ds}/{p.relative_to(data / ds)}")

        def record(tool: str, ds: str, direction: str, r: dict[str, Any], nbytes: int,
                   files: int) -> dict[str, Any]:
            row = {"tool": tool, "dataset": ds, "direction": direction, "files": files,
                   "bytes": nbytes, "seconds": r["seconds"],
                   "mib_per_s": round(nbytes / (1 << 20) / max(r["seconds"], 1e-9), 1),
                   "peak_rss_mib": r["peak_rss_mib"]}
            results["runs"].append(row)
            print(f"{tool:<12}{ds:<6}{direction:<10}{r['seconds']:>9.2f} s "
                  f"{row['mib_per_s']:>9.1f} MiB/s {r['peak_rss_mib']:>8.1f} MiB RSS", flush=True)
            return row

        for ds in [d for d in ("big", "small") if d in args.datasets.split(",")]:
            files, nbytes = tree_bytes(data / ds)
            for tool in tools:
                home = work / f"home-{tool}-{ds}"
                tenv = {**env, "CLUSTERFLOW_HOME": str(home)}
                bucket = f"bench-up-{tool}"
                s3.create_bucket(Bucket=bucket)
                r = timed(command(tool, exes[tool], str(data / ds), f"s3://{bucket}/{ds}/",
                                  server.url, args.concurrency), tenv)
                record(tool, ds, "up", r, nbytes, files)
                empty_bucket(s3, bucket)  # moto holds objects in memory

                dest = work / f"down-{tool}-{ds}"
                r = timed(command(tool, exes[tool], f"s3://bench-source/{ds}/", str(dest),
                                  server.url, args.concurrency), tenv)
                got = tree_bytes(dest)
                if got != (files, nbytes):
                    raise RuntimeError(f"{tool} downloaded {got}, expected {(files, nbytes)}")
                record(tool, ds, "down", r, nbytes, files)
                if ds == "small":
                    again = timed(command(tool, exes[tool], f"s3://bench-source/{ds}/",
                                          str(dest), server.url, args.concurrency), tenv)
                    record(tool, ds, "re-stage", again, nbytes, files)
                    if tool == "clusterflow":
                        summary = json.loads(again["stdout"])
                        if summary["copied"] != 0:
                            raise RuntimeError(f"re-stage copied {summary['copied']} files")
                shutil.rmtree(dest)

        by = {(r["tool"], r["dataset"], r["direction"]): r["seconds"] for r in results["runs"]}
        ratios = results["ratios"]
        for ds in ("big", "small"):
            for direction in ("up", "down"):
                cf = by.get(("clusterflow", ds, direction))
                for other in ("awscli", "s5cmd"):
                    o = by.get((other, ds, direction))
                    if cf and o:
                        # > 1 means clusterflow is faster (goal: > 1 vs awscli, >= 0.8 vs s5cmd)
                        ratios[f"{ds}_{direction}_speed_vs_{other}"] = round(o / cf, 2)
        first, again = by.get(("clusterflow", "small", "down")), by.get(
            ("clusterflow", "small", "re-stage"))
        if first and again:
            ratios["small_restage_speedup"] = round(first / again, 1)  # goal: >= 20
        print(json.dumps(ratios, indent=2))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
