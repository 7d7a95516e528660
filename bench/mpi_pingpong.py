"""MPI ping-pong and allreduce: mpi4py's buffer API vs its pickle API, across message sizes.

Two ranks exchange messages of 1 B .. --max-size bytes:

* ping-pong, buffer API: ``Send``/``Recv`` of a numpy uint8 array (no serialisation);
* the same with never-written ``np.empty`` buffers, as ``mpi4py.bench`` allocates them. Pages
  that were never written all map to the kernel's one zero page, so a large copy from them
  reads cache-resident memory: this is why mpi4py's own 1 MiB figure is ~2x the written
  buffer's (measured: 18.6 vs 9.1 GB/s). Real messages hold data, so the written buffer is
  the honest number; the untouched series is kept only to show where the gap comes from;
* ping-pong, pickle API: ``send``/``recv`` of the same numpy array (pickled on every call,
  as ``mpi4py.bench pingpong -p`` does);
* allreduce (sum of float64), buffer API ``Allreduce`` vs pickle API ``allreduce`` of the same
  numpy array (pickled, reduced in Python).

Latency is the one-way time (half a round trip, mean over the loop, after warm-up), bandwidth
is size / latency. The reference is mpi4py's own ``python -m mpi4py.bench pingpong`` (buffer
and ``-p`` pickle modes), run in the same invocation and parsed.

    .venv/bin/python bench/mpi_pingpong.py                       # up to 4 MiB
    .venv/bin/python bench/mpi_pingpong.py --max-size 65536 --loop-scale 0.1   # smoke

Writes ``bench/results/mpi_pingpong.json``. (Internally re-launches itself under mpiexec with
``--worker``.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kernels_common import REPO, machine, mpiexec, write_results


def _sizes(max_size: int) -> list[int]:
    sizes, s = [], 1
    while s <= max_size:
        sizes.append(s)
        s *= 2
    return sizes


def _loops(size: int, scale: float) -> tuple[int, int]:
    loop = int(max(20, min(5000, (1 << 24) // max(size, 1))) * scale)
    return max(loop, 5), max(2, loop // 10)


def worker(max_size: int, scale: float, out: Path) -> None:
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    other = 1 - rank
    assert comm.Get_size() == 2, "run with exactly 2 ranks"
    rows: dict[str, list[dict[str, float]]] = {
        "pingpong_buffer": [], "pingpong_buffer_untouched": [], "pingpong_pickle": [],
        "allreduce_buffer": [], "allreduce_pickle": []}

    def timed(body: Any, loop: int, skip: int) -> float:
        for _ in range(skip):
            body()
        comm.Barrier()
        t0 = MPI.Wtime()
        for _ in range(loop):
            body()
        return (MPI.Wtime() - t0) / loop

    for size in _sizes(max_size):
        loop, skip = _loops(size, scale)
        buf = np.ones(size, dtype=np.uint8)  # separate send and receive buffers, as in
        rbuf = np.empty(size, dtype=np.uint8)  # mpi4py.bench

        def pp_buffer(buf: Any = buf, rbuf: Any = rbuf) -> None:
            if rank == 0:
                comm.Send([buf, MPI.BYTE], dest=other, tag=1)
                comm.Recv([rbuf, MPI.BYTE], source=other, tag=1)
            else:
                comm.Recv([rbuf, MPI.BYTE], source=other, tag=1)
                comm.Send([buf, MPI.BYTE], dest=other, tag=1)

        ubuf = np.empty(size, dtype=np.uint8)  # never written: zero-page backed when large
        urbuf = np.empty(size, dtype=np.uint8)

        def pp_untouched(buf: Any = ubuf, rbuf: Any = urbuf) -> None:
            pp_buffer(buf, rbuf)

        def pp_pickle(obj: Any = buf) -> None:
            if rank == 0:
                comm.send(obj, dest=other, tag=2)
                comm.recv(source=other, tag=2)
            else:
                msg = comm.recv(source=other, tag=2)
                comm.send(msg, dest=other, tag=2)

        count = max(1, size // 8)
        vec = np.ones(count)
        res = np.empty(count)

        def ar_buffer(vec: Any = vec, res: Any = res) -> None:
            comm.Allreduce([vec, MPI.DOUBLE], [res, MPI.DOUBLE], op=MPI.SUM)

        def ar_pickle(vec: Any = vec) -> None:
            comm.allreduce(vec, op=MPI.SUM)

        for name, body, round_trip in (("pingpong_buffer", pp_buffer, True),
                                       ("pingpong_buffer_untouched", pp_untouched, True),
                                       ("pingpong_pickle", pp_pickle, True),
                                       ("allreduce_buffer", ar_buffer, False),
                                       ("allreduce_pickle", ar_pickle, False)):
            seconds = timed(body, loop, skip)
            latency = seconds / 2 if round_trip else seconds
            nbytes = size if name.startswith("pingpong") else count * 8
            rows[name].append({"bytes": nbytes, "seconds": latency,
                               "mb_per_s": nbytes / latency / 1e6, "loop": loop})
    if rank == 0:
        out.write_text(json.dumps(rows))


def _parse_mpi4py_bench(text: str) -> list[dict[str, float]]:
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or line.lstrip().startswith("#") or "|" not in line:
            continue
        try:
            size, bw = int(parts[0]), float(parts[1])
            mean = float(line.split("|")[1].split()[0])
        except (ValueError, IndexError):
            continue
        rows.append({"bytes": size, "seconds": mean, "mb_per_s": bw})
    return rows


def _reference(max_size: int, scale: float, pickle: bool) -> list[dict[str, float]]:
    loop, skip = _loops(1, scale)
    cmd = [*mpiexec(2), sys.executable, "-m", "mpi4py.bench", "pingpong", "-n", str(max_size),
           "-l", str(loop), "-s", str(skip), "--loop-large", str(max(5, loop // 50)),
           "--skip-large", str(max(2, skip // 10))]
    if pickle:
        cmd.append("-p")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return _parse_mpi4py_bench(proc.stdout)


def driver(max_size: int, scale: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [*mpiexec(2), sys.executable, __file__, "--worker", "--max-size", str(max_size),
               "--loop-scale", str(scale), "--rows", str(out)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        rows = json.loads(out.read_text())
        rows["mpi4py_bench_buffer"] = _reference(max_size, scale, pickle=False)
        rows["mpi4py_bench_pickle"] = _reference(max_size, scale, pickle=True)
        elapsed = time.perf_counter() - t0

    def at(name: str, size: int) -> dict[str, float] | None:
        return next((r for r in rows[name] if r["bytes"] == size), None)

    summary = {}
    for size in (8, 1024, 65536, 1 << 20, max_size):
        entry: dict[str, Any] = {}
        for name in rows:
            row = at(name, size)
            if row:
                entry[name] = {"us": row["seconds"] * 1e6, "mb_per_s": row["mb_per_s"]}
        summary[str(size)] = entry
    result = {"machine": machine(), "args": {"max_size": max_size, "loop_scale": scale},
              "seconds": elapsed, "series": rows, "summary": summary}
    path = write_results("mpi_pingpong", result)

    names = ["pingpong_buffer", "pingpong_buffer_untouched", "mpi4py_bench_buffer",
             "pingpong_pickle", "mpi4py_bench_pickle",
             "allreduce_buffer", "allreduce_pickle"]
    print(f"{'bytes':>9} " + " ".join(f"{n:>22}" for n in names))
    for size in _sizes(max_size)[::2]:
        cells = []
        for name in names:
            row = at(name, size) if name.startswith(("pingpong", "mpi4py")) else next(
                (r for r in rows[name] if r["bytes"] == max(8, size // 8 * 8)), None)
            cells.append(f"{row['seconds'] * 1e6:9.2f}us {row['mb_per_s']:8.1f}MB/s"
                         if row else f"{'-':>22}")
        print(f"{size:>9} " + " ".join(cells))
    print(f"wrote {path}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-size", type=int, default=4 << 20, help="largest message (bytes)")
    parser.add_argument("--loop-scale", type=float, default=1.0,
                        help="multiply iteration counts (smaller = quicker, noisier)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.max_size, args.loop_scale, args.rows)
        return 0
    return driver(args.max_size, args.loop_scale)


if __name__ == "__main__":
    raise SystemExit(main())
