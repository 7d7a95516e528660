"""Plot and tabulate the kernel benchmarks' latest results.

Reads whichever of ``bench/results/{kernels_heat,kernels_kmer,mpi_pingpong}.json`` exist and
writes ``bench/results/kernels.png`` (bandwidth, scaling, k-mer throughput, ping-pong and
allreduce across message sizes) and ``bench/results/kernels_summary.md`` (the table the README
shows).

    .venv/bin/python bench/kernels_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _bandwidth(ax: Any, heat: dict[str, Any]) -> None:
    names = ["triad", "numba", "numba_with_total_heat", "numpy_ufunc_out",
             "numpy_straightforward"]
    labels = ["triad\n(limit)", "heat\nnumba", "heat numba\n+ total heat", "heat numpy\n(out=)",
              "heat numpy\n(plain)"]
    values = [heat["triad"]["gb_per_s"]] + [heat["heat"][n]["gb_per_s"] for n in names[1:]]
    bars = ax.bar(labels, values, color=["grey", "C0", "C0", "C1", "C1"])
    ax.tick_params(axis="x", labelsize=8)
    ax.bar_label(bars, fmt="%.1f")
    ax.axhline(heat["triad"]["gb_per_s"] / 2, color="grey", ls="--", lw=1, label="50% of triad")
    ax.set_ylabel("GB/s (triad 24 B/elem, heat 16 B/cell)")
    ax.set_title(f"1 rank, {heat['heat']['n']}² grid")
    ax.legend(fontsize=8)


def _scaling(ax: Any, heat: dict[str, Any]) -> None:
    runs = heat["scaling"]["runs"]
    ranks = [int(r) for r in runs]
    speedup = [runs[str(r)]["speedup"] for r in ranks]
    ax.plot(ranks, ranks, "k--", lw=1, label="ideal")
    ax.plot(ranks, speedup, "o-", label="heat (compute timer)")
    for r, s in zip(ranks, speedup, strict=True):
        ax.annotate(f"{s / r:.0%}", (r, s), textcoords="offset points", xytext=(5, -12))
    ax.set_xlabel("ranks")
    ax.set_ylabel("speedup")
    ax.set_xticks(ranks)
    ax.set_title(f"heat {heat['scaling']['n']}² x {heat['scaling']['steps']} steps")
    ax.legend(fontsize=8)


def _kmer(ax: Any, kmer: dict[str, Any]) -> None:
    labels = ["Counter\n(serial)"] + [f"kmer\n{r} rank(s)" for r in kmer["kernel"]]
    values = [kmer["counter"]["kmers_per_second"] / 1e6] + [
        r["kmers_per_second"] / 1e6 for r in kmer["kernel"].values()]
    bars = ax.bar(labels, values, color=["C1"] + ["C0"] * len(kmer["kernel"]))
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("million k-mers / s")
    ax.set_title(f"k-mer counting, k={kmer['args']['k']}, {kmer['input_bytes'] / 1e6:.0f} MB")


def _series(ax: Any, ping: dict[str, Any], names: list[str], key: str, title: str) -> None:
    for name in names:
        rows = ping["series"].get(name)
        if rows:
            ax.plot([r["bytes"] for r in rows], [r[key] for r in rows], ".-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message bytes")
    ax.set_ylabel("MB/s" if key == "mb_per_s" else "seconds")
    ax.set_title(title)
    ax.legend(fontsize=7)


def _summary(heat: dict[str, Any] | None, kmer: dict[str, Any] | None,
             ping: dict[str, Any] | None, tools: dict[str, Any] | None = None) -> str:
    rows = ["| measure | value | target |", "|---|---|---|"]
    if heat:
        r = heat["ratios"]
        rows += [
            f"| triad bandwidth (1 core) | {heat['triad']['gb_per_s']:.1f} GB/s | |",
            f"| heat 2D numba (1 rank) | {heat['heat']['numba']['gb_per_s']:.1f} GB/s = "
            f"{r['heat_numba_over_triad']:.0%} of triad | >= 70% |",
            f"| heat 2D numba + total heat | "
            f"{heat['heat']['numba_with_total_heat']['gb_per_s']:.1f} GB/s = "
            f"{r['heat_numba_with_total_heat_over_triad']:.0%} of triad | >= 62% |",
            f"| heat numba vs plain numpy | {r['heat_numba_over_numpy_straightforward']:.1f}x "
            "| >= 3x |",
        ]
        if r.get("parallel_efficiency_2_ranks") is not None:
            rows.append(f"| heat 1 -> 2 ranks efficiency ({heat['scaling']['n']}²) | "
                        f"{r['parallel_efficiency_2_ranks']:.0%} | >= 80% |")
    if kmer:
        for ranks, run in kmer["kernel"].items():
            rows.append(f"| kmer vs serial Counter, per rank ({ranks} rank(s)) | "
                        f"{run['speedup_per_rank']:.1f}x | >= 10x |")
    if tools:
        t, r = tools["tools"], tools["ratios"]
        for name in ("kmc_2_threads", "jellyfish_2_threads", "kmer_1_rank", "kmer_2_ranks"):
            rows.append(f"| {name.replace('_', ' ')}, {tools['bases'] / 1e6:.0f} Mbase, "
                        f"k={tools['args']['k']} | {t[name]['wall_seconds_median']:.2f} s "
                        f"(median), {t[name]['peak_rss_mib']:.0f} MiB peak RSS | |")
        rows.append(f"| kmer 2 ranks ÷ KMC 2 threads (median) | "
                    f"{r['kmer_2_over_kmc']['median']:.2f} | <= 0.8 |")
        agree = tools["agreement"]
        rows.append("| counts agree with KMC / jellyfish | "
                    f"{agree['histogram_equals_kmc'] and agree['top_equals_kmc']} / "
                    f"{agree['histogram_equals_jellyfish'] and agree['top_equals_jellyfish']} "
                    "| True |")
    if ping:
        small, big = ping["summary"].get("8", {}), ping["summary"].get(str(1 << 20), {})
        for label, data, key in (("8 B", small, "us"), ("1 MiB", big, "mb_per_s")):
            unit = "µs" if key == "us" else "MB/s"
            parts = [f"{name} {data[name][key]:.1f} {unit}" for name in
                     ("pingpong_buffer", "pingpong_buffer_untouched", "pingpong_pickle",
                      "mpi4py_bench_buffer", "mpi4py_bench_pickle") if name in data]
            if parts:
                rows.append(f"| ping-pong {label} | {'; '.join(parts)} | |")
    machine = (heat or kmer or ping or {}).get("machine", {})
    note = (f"\nMeasured on {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores), load "
            f"average at start {machine.get('loadavg_at_start')}.\n")
    return "\n".join(rows) + "\n" + note


def main() -> int:
    heat, kmer, ping = _load("kernels_heat"), _load("kernels_kmer"), _load("mpi_pingpong")
    panels = [p for p in (heat and "bandwidth", heat and "scaling", kmer and "kmer",
                          ping and "pingpong", ping and "allreduce") if p]
    if not panels:
        print("no results yet: run bench/kernels_heat.py, kernels_kmer.py or mpi_pingpong.py")
        return 1
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.5 * rows), squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels, strict=False):
        if panel == "bandwidth":
            _bandwidth(ax, heat)  # type: ignore[arg-type]
        elif panel == "scaling":
            _scaling(ax, heat)  # type: ignore[arg-type]
        elif panel == "kmer":
            _kmer(ax, kmer)  # type: ignore[arg-type]
        elif panel == "pingpong":
            _series(ax, ping, ["pingpong_buffer", "pingpong_buffer_untouched",  # type: ignore[arg-type]
                               "mpi4py_bench_buffer", "pingpong_pickle",
                               "mpi4py_bench_pickle"], "mb_per_s", "ping-pong bandwidth")
        else:
            _series(ax, ping, ["allreduce_buffer", "allreduce_pickle"], "seconds",  # type: ignore[arg-type]
                    "allreduce (2 ranks) time per call")
    fig.tight_layout()
    png = RESULTS / "kernels.png"
    fig.savefig(png, dpi=110)
    table = _summary(heat, kmer, ping, _load("kernels_kmer_tools"))
    (RESULTS / "kernels_summary.md").write_text(table)
    print(table)
    print(f"wrote {png} and {RESULTS / 'kernels_summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
