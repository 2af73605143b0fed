"""Plot p50/p99 latency and throughput vs offered load for the three serving modes, from gpu_bench JSON.

Run where matplotlib is installed (the GPU machine may lack it):
    python -m benchmarks.plot benchmarks/results/gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {"per_item": ("tab:red", "(a) one forward per item"),
         "per_request": ("tab:orange", "(b) one forward per request"),
         "coalescer": ("tab:blue", "(c) coalescer")}


def plot(report: dict, out: Path) -> None:
    towers = report["towers"]
    fig, axes = plt.subplots(2, len(towers), figsize=(5.2 * len(towers), 8.5), squeeze=False)
    for col, (name, r) in enumerate(towers.items()):
        loads = [row["load"] * 100 for row in r["loads"]]
        lat, thr = axes[0][col], axes[1][col]
        for mode, (color, label) in STYLE.items():
            ms = [row["modes"][mode] for row in r["loads"]]
            lat.plot(loads, [m["p50_ms"] for m in ms], "o-", color=color, label=f"{label} p50")
            lat.plot(loads, [m["p99_ms"] for m in ms], "s--", color=color, alpha=0.6, label=f"{label} p99")
            thr.plot(loads, [m["patches_per_s"] / r["limit"]["patches_per_s"] for m in ms], "o-", color=color,
                     label=label)
        lat.axhline(r["single_forward_ms"], color="gray", lw=0.8, ls=":", label="one direct forward")
        lat.set_yscale("log")
        lat.set_title(f"{name}: request latency")
        lat.set_xlabel("offered load, % of offline best-batch throughput")
        lat.set_ylabel("ms (log)")
        thr.plot(loads, [x / 100 for x in loads], color="gray", lw=0.8, ls=":", label="offered")
        thr.axhline(0.95, color="green", lw=0.8, ls="--", label="target 0.95")
        thr.set_title(f"{name}: throughput / offline limit ({r['limit']['patches_per_s']:.0f} patches/s)")
        thr.set_xlabel("offered load, % of offline best-batch throughput")
        thr.set_ylabel("achieved / limit")
        for ax in (lat, thr):
            ax.grid(alpha=0.3)
            ax.set_xticks(loads)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", nargs="+", type=Path)
    args = p.parse_args()
    for path in args.json:
        out = path.with_suffix(".png")
        plot(json.loads(path.read_text()), out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
