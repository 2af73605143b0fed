"""Turn the harness's per-family ``results-<family>.json`` into ``real_server_summary.json`` and a plot.

Every ratio is plugin-on over plugin-off from runs made side by side in one harness run (same servers,
same seeds). Seed-workload ratios are medians over the alternated pairs; each comes with its spread
(min and max of the per-pair ratios) and the raw per-run values.

usage: python scripts/gpu_serve/summarize.py RESULTS.json [...] --out benchmarks/results/real_server_summary.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

SEED_METRICS = {"median_ttft_ratio": "median_ttft_ms", "mean_ttft_ratio": "mean_ttft_ms",
                "p99_ttft_ratio": "p99_ttft_ms", "throughput_ratio": "total_throughput",
                "duration_ratio": "duration"}
POISSON_METRICS = {"ttft_p50_ratio": "median_ttft_ms", "ttft_p99_ratio": "p99_ttft_ms",
                   "itl_p50_ratio": "median_itl_ms", "itl_p99_ratio": "p99_itl_ms", "tok_s_ratio": "total_throughput"}


def _ratio(on: float, off: float) -> float:
    return round(on / off, 4) if off else float("nan")


def seed_summary(runs: dict) -> dict | None:
    pairs = sorted({k.split("-")[0] for k in runs if k.startswith("seed") and not k.startswith("seedwarm")})
    pairs = [p for p in pairs if f"{p}-off" in runs and f"{p}-on" in runs]
    if not pairs:
        return None
    out: dict = {"runs": len(pairs)}
    for name, key in SEED_METRICS.items():
        ratios = [_ratio(runs[f"{p}-on"][key], runs[f"{p}-off"][key]) for p in pairs]
        out[name] = round(statistics.median(ratios), 4)
        out[f"{name}_spread"] = [min(ratios), max(ratios)]
    for mode in ("off", "on"):
        out[mode] = {key: [round(runs[f"{p}-{mode}"][key], 2) for p in pairs] for key in SEED_METRICS.values()}
        out[mode]["coalescer"] = [runs[f"{p}-{mode}"].get("coalescer") for p in pairs] if mode == "on" else None
    return out


def poisson_summary(runs: dict, capacity: float | None) -> dict:
    out: dict = {}
    for key in runs:
        if not key.startswith("poisson") or not key.endswith("-off"):
            continue
        load = key[len("poisson"):-len("-off")]
        if f"poisson{load}-on" not in runs:
            continue
        off, on = runs[key], runs[f"poisson{load}-on"]
        out[load] = {name: _ratio(on[m], off[m]) for name, m in POISSON_METRICS.items()}
        out[load]["rate_req_s"] = off.get("request_rate")
        out[load]["off"] = {m: off[m] for m in POISSON_METRICS.values()}
        out[load]["on"] = {m: on[m] for m in POISSON_METRICS.values()}
        out[load]["on"]["coalescer"] = on.get("coalescer")
    if out:
        out["capacity_req_s"] = capacity
    return dict(sorted(out.items()))


def family_summary(result: dict) -> dict:
    runs = result["runs"]
    fam: dict = {}
    seed = seed_summary(runs)
    if seed:
        fam["seed"] = seed
    poisson = poisson_summary(runs, result.get("capacity_req_s"))
    if poisson:
        fam["poisson"] = poisson
    if "lone-off" in runs and "lone-on" in runs:
        fam["lone"] = {"ttft_ratio": _ratio(runs["lone-on"]["median_ttft_ms"], runs["lone-off"]["median_ttft_ms"]),
                       "off_ms": runs["lone-off"]["median_ttft_ms"], "on_ms": runs["lone-on"]["median_ttft_ms"]}
    correct = result.get("correctness")
    if correct:
        fam["outputs_identical"] = bool(correct["all_identical"])
        fam["outputs_compared"] = {"image_requests": correct["requests"], "identical": correct["identical"],
                                   "video_requests": correct.get("video_requests", 0)}
    return fam


def plot(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: pip install matplotlib for the plot")
        return False
    families = summary["families"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(families)
    for i, key in enumerate(("median_ttft_ratio", "throughput_ratio")):
        vals = [families[f].get("seed", {}).get(key, float("nan")) for f in names]
        spreads = [families[f].get("seed", {}).get(f"{key}_spread", [v, v]) for f, v in zip(names, vals, strict=True)]
        pairs = list(zip(vals, spreads, strict=True))
        err = [[v - s[0] for v, s in pairs], [s[1] - v for v, s in pairs]]
        axes[0].bar([x + 0.4 * i for x in range(len(names))], vals, 0.4, yerr=err, label=key)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_xticks([x + 0.2 for x in range(len(names))], names)
    axes[0].set_title("seed workload (100 x 6 images): on / off")
    axes[0].legend()
    for f in names:
        poisson = {k: v for k, v in families[f].get("poisson", {}).items() if k != "capacity_req_s"}
        loads = sorted(poisson, key=float)
        xs = [float(x) for x in loads]
        axes[1].plot(xs, [poisson[x]["ttft_p50_ratio"] for x in loads], "o-", label=f"{f} TTFT p50")
        axes[1].plot(xs, [poisson[x]["itl_p99_ratio"] for x in loads], "s--", label=f"{f} ITL p99")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xlabel("load (fraction of plugin-off capacity)")
    axes[1].set_title("Poisson: on / off")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"mm-scheduler in a real SGLang {summary['sglang']} server, {summary['gpu']} ({summary['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/real_server_summary.json"))
    args = p.parse_args()
    loaded = [json.loads(r.read_text()) for r in args.results]
    summary = {"sglang": loaded[0].get("sglang", ""), "gpu": loaded[0].get("gpu", ""),
               "commit": loaded[0].get("commit", ""), "families": {}}
    for result in loaded:
        summary["families"][result["family"]] = family_summary(result)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    for fam, s in summary["families"].items():
        seed = s.get("seed", {})
        print(f"{fam}: seed median TTFT {seed.get('median_ttft_ratio')} "
              f"(spread {seed.get('median_ttft_ratio_spread')}),"
              f" throughput {seed.get('throughput_ratio')}, lone {s.get('lone', {}).get('ttft_ratio')},"
              f" identical {s.get('outputs_identical')}")
        for load, v in s.get("poisson", {}).items():
            if load != "capacity_req_s":
                print(f"   poisson {load}: TTFT p50 {v['ttft_p50_ratio']} ITL p99 {v['itl_p99_ratio']} "
                      f"tok/s {v['tok_s_ratio']}")
    if plot(summary, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
