"""Plot the serving benchmark: TTFT, ITL, output tokens/s and encoder batch size against offered load, per mode.

``serving_bench`` calls :func:`plot` itself when matplotlib is installed; elsewhere run
    python -m benchmarks.plot_serving benchmarks/results/serving_bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

STYLE = {"inline": ("tab:red", "inline (one encode per request)"),
         "inline-batched": ("tab:orange", "inline-batched (SGLang today)"),
         "plugin": ("tab:blue", "plugin (early encoding)"),
         "plugin-tuned": ("tab:green", "plugin-tuned (+ admission guard)"),
         "plugin-equal-priority": ("tab:purple", "plugin, LLM stream at priority 0")}


def plot(report: dict[str, Any], meta: dict[str, Any] | None, out: Path) -> None:
    rows = report["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ttft, itl), (tok, enc) = axes
    for mode in modes:
        color, label = STYLE.get(mode, ("gray", mode))
        ms = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["load"])
        loads = [r["load"] * 100 for r in ms]
        ttft.plot(loads, [r["ttft_p50_ms"] for r in ms], "o-", color=color, label=f"{label} p50")
        ttft.plot(loads, [r["ttft_p99_ms"] for r in ms], "s--", color=color, alpha=0.5, label=f"{label} p99")
        itl.plot(loads, [r["itl_p50_ms"] for r in ms], "o-", color=color, label=f"{label} p50")
        itl.plot(loads, [r["itl_p99_ms"] for r in ms], "s--", color=color, alpha=0.5, label=f"{label} p99")
        tok.plot(loads, [r["tok_s"] for r in ms], "o-", color=color, label=label)
        enc.plot(loads, [r.get("encoder_units_per_call_mean", 0.0) for r in ms], "o-", color=color, label=label)
    for ax, title, ylabel, log in ((ttft, "time to first token", "ms (log)", True),
                                   (itl, "inter-token latency", "ms (log)", True),
                                   (tok, "output tokens/s during arrivals", "tokens/s", False),
                                   (enc, "encoder batch size", "units (images, video slices) per forward", False)):
        ax.set_title(title)
        ax.set_xlabel("offered load, % of inline's capacity")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ttft.legend(fontsize=7)
    tok.legend(fontsize=7)
    capacity = f"; inline capacity {meta['inline_capacity_req_s']:.1f} req/s" if meta else ""
    fig.suptitle(f"{report['device']}: {report['llm_shape']}{capacity}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("json", nargs="+", type=Path)
    args = p.parse_args()
    for path in args.json:
        meta_path = path.with_name(f"{path.stem}_meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        out = path.with_suffix(".png")
        plot(json.loads(path.read_text()), meta, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
