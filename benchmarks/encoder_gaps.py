"""Encoder-level gaps of issue 9, measured in one run (about 2-3 minutes on an H100).

1. Lone request: >= 300 interleaved rounds per tower; each round calls, in a rotating order, the direct
   eager forward, the coalescer (lone fast path on), the coalescer with that fast path off (the old
   loop -> forward thread -> loop -> event waiter -> loop hops) and, for uniform towers on CUDA, the
   coalescer over a :class:`GraphedTower` and the graphed tower called directly. Reported: median
   paired excess over the direct eager call with a 95 % distribution-free interval, and where the
   time goes (host timestamps at call, forward entry, forward exit, return).
2. Graph vs eager SigLIP forwards at batch 1/2/4/8, outputs compared.
3. Mixed-resolution SigLIP: overload (150 %) throughput over the offline best batch, and 10 %-load
   p50 of single-image requests against direct per-item serving, with and without graphs.

    python -m benchmarks.encoder_gaps --device cuda --out benchmarks/results
    python -m benchmarks.encoder_gaps --smoke          # tiny towers on CPU; graphs are skipped there
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import (
    TowerWrapper,
    build_bench_tower,
    bytes_per_patch,
    device_name,
    format_table,
    log,
    resolve,
    write_json,
)
from mm_scheduler import Coalescer, CoalescerConfig, EncodeItem
from mm_scheduler.towers.graphs import GraphedTower

LONE_TOWERS = ("siglip", "siglip-mixed", "qwen2_5_vl")


def median_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """Median and its distribution-free ~95 % interval (order statistics of the binomial(n, 1/2))."""
    s = sorted(values)
    n = len(s)
    half = z * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half))
    return statistics.median(s), s[lo], s[hi]


class Stamped(TowerWrapper):
    """Forwards to ``tower`` and stamps host time at forward entry and exit (the forward thread's view)."""

    def __init__(self, tower: Any) -> None:
        super().__init__(tower)
        self.enter = self.exit = 0.0

    def forward(self, units: Sequence[EncodeItem]) -> Sequence[torch.Tensor]:
        self.enter = time.perf_counter()
        out = self.inner.forward(units)
        self.exit = time.perf_counter()
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lone_items(name: str, tower: Any, count: int = 8) -> list[EncodeItem]:
    pin = tower.device.type == "cuda"
    gen = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    if tower.ragged:
        grids = [(8, 8), (8, 12)] if getattr(tower.config, "depth", 32) < 8 else [(16, 16), (24, 24), (32, 32)]
        out = []
        for _ in range(count):
            g = rng.choice(grids)
            out.append(EncodeItem(tower.make_pixels(*g, pin=pin, generator=gen), g[0] * g[1], meta={"grid_hw": g}))
        return out
    sizes = tower.resolutions
    return [EncodeItem(tower.make_pixels(r := sizes[i % len(sizes)], pin=pin, generator=gen), tower.patches_for(r))
            for i in range(max(count, 2 * len(sizes)))]


async def lone(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    tower = build_bench_tower(name, device, args.tiny)
    cuda = device.type == "cuda"
    bpp = bytes_per_patch(tower)
    items = lone_items(name, tower)
    use_graphs = cuda and not tower.ragged
    graphed = GraphedTower(tower, max_batch=4, budget_bytes=args.graph_budget_mib << 20) if use_graphs else None
    config = CoalescerConfig(max_wait_ms=2.0, budget_bytes=1 << 30, bytes_per_patch=bpp, dedup=False, name=name)
    stream = torch.cuda.Stream(device) if cuda else None
    paths: dict[str, Stamped] = {"direct": Stamped(tower), "coalescer": Stamped(tower),
                                 "coalescer_hops": Stamped(tower)}
    if graphed is not None:
        paths["coalescer_graphs"] = Stamped(graphed)
        paths["direct_graphs"] = Stamped(graphed)
    samples: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in paths}
    async with contextlib.AsyncExitStack() as stack:
        coalescers = {}
        for key in paths:
            if key.startswith("coalescer"):
                co = await stack.enter_async_context(Coalescer(paths[key], config.replace(name=f"{name}-{key}")))
                co._sync_lone_inline = key != "coalescer_hops"  # the old hand-off path, for comparison
                coalescers[key] = co

        async def call(key: str, item: EncodeItem) -> tuple[float, float, float, float]:
            stamped = paths[key]
            t0 = time.perf_counter()
            if key in coalescers:
                await coalescers[key].encode([item])
            else:
                with (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()), \
                        torch.inference_mode():
                    stamped.forward([item])
                    sync(device)
            return t0, stamped.enter, stamped.exit, time.perf_counter()

        warm = 2 * len(items) + 3  # every shape twice: graphs capture at the second use
        keys = list(paths)
        for i in range(warm + args.reps):
            item = items[i % len(items)]
            order = keys[i % len(keys):] + keys[:i % len(keys)]  # rotate, so no path always runs first
            for key in order:
                stamps = await call(key, item)
                if i >= warm:
                    samples[key].append(stamps)
    total = {k: [(r - t0) * 1e3 for t0, _, _, r in v] for k, v in samples.items()}
    res: dict[str, Any] = {"tower": name, "reps": args.reps, "graphs": use_graphs,
                           "graph_stats": vars(graphed.stats) | {"keys": [str(k) for k in graphed.stats.keys]}
                           if graphed is not None else None,
                           "median_ms": {k: statistics.median(v) for k, v in total.items()}, "paths": {}}
    for key, stamps in samples.items():
        row: dict[str, Any] = {
            "median_ms": statistics.median(total[key]),
            "to_forward_ms": statistics.median((e - t0) * 1e3 for t0, e, _, _ in stamps),
            "forward_host_ms": statistics.median((x - e) * 1e3 for _, e, x, _ in stamps),
            "after_forward_ms": statistics.median((r - x) * 1e3 for _, _, x, r in stamps),
        }
        if key != "direct":
            diffs = [a - b for a, b in zip(total[key], total["direct"], strict=True)]
            med, lo, hi = median_ci(diffs)
            row.update(excess_ms=med, excess_ci95_ms=[lo, hi],
                       ratio_to_direct=statistics.median(a / b for a, b in zip(total[key], total["direct"],
                                                                               strict=True)))
        res["paths"][key] = row
    co = res["paths"]["coalescer"]
    res["targets"] = {"lone_excess_ms": co["excess_ms"], "lone_excess_ok": co["excess_ci95_ms"][1] <= 0.5}
    if "coalescer_graphs" in res["paths"]:
        ratio = res["paths"]["coalescer_graphs"]["ratio_to_direct"]
        res["targets"].update(graphs_ratio_to_eager_direct=ratio, graphs_ratio_ok=ratio <= 0.6)
    log(f"{name}: lone " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res["paths"].items()))
    del tower, graphed
    if cuda:
        torch.cuda.empty_cache()
    return res


def graph_vs_eager(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """SigLIP forwards per batch size, eager vs replayed; outputs compared row by row."""
    tower = build_bench_tower("siglip", device, args.tiny)
    graphed = GraphedTower(tower, max_batch=8, budget_bytes=args.graph_budget_mib << 20)
    stream = torch.cuda.Stream(device)
    gen = torch.Generator().manual_seed(5)
    rows = []
    for batch in (1, 2, 4, 8):
        units = [EncodeItem(tower.make_pixels(pin=True, generator=gen), tower.patches_for(tower.resolutions[0]))
                 for _ in range(batch)]
        times: dict[str, list[float]] = {"eager": [], "graph": []}
        outs: dict[str, list[torch.Tensor]] = {}
        with torch.cuda.stream(stream), torch.inference_mode():
            for rep in range(args.graph_reps + 3):
                for key, t in (("eager", tower), ("graph", graphed)):
                    t0 = time.perf_counter()
                    out = list(t.forward(units))
                    stream.synchronize()
                    if rep >= 3:
                        times[key].append((time.perf_counter() - t0) * 1e3)
                    outs[key] = out
        errs = [float((a.double() - b.double()).norm() / b.double().norm())
                for a, b in zip(outs["graph"], outs["eager"], strict=True)]
        eager, graph = statistics.median(times["eager"]), statistics.median(times["graph"])
        rows.append({"batch": batch, "eager_ms": eager, "graph_ms": graph, "speedup": eager / graph,
                     "identical": all(torch.equal(a, b) for a, b in zip(outs["graph"], outs["eager"], strict=True)),
                     "max_rel_err": max(errs)})
        log(f"graph vs eager batch {batch}: {eager:.2f} -> {graph:.2f} ms ({eager / graph:.2f}x), "
            f"max rel err {max(errs):.1e}")
    rows_stats = vars(graphed.stats) | {"keys": [str(k) for k in graphed.stats.keys]}
    rows.append({"batch": "stats", **{k: v for k, v in rows_stats.items() if k != "keys"}})
    del tower, graphed
    torch.cuda.empty_cache()
    return rows


def mixed_loads(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """siglip-mixed through gpu_bench's own workload, sweep and replay: overload and 10 % load."""
    from benchmarks import gpu_bench as gb

    cuda = device.type == "cuda"
    tower = build_bench_tower("siglip-mixed", device, args.tiny)
    work = gb.Workload("siglip-mixed", tower, args.tiny)
    bpp = bytes_per_patch(tower)
    budget_bytes = args.budget_bytes
    stream = torch.cuda.Stream(device) if cuda else None
    sweep = gb.offline_sweep(tower, work, budget_bytes // bpp, stream, args.sweep_seconds)
    best = max(sweep, key=lambda r: r["patches_per_s"])
    mean_patches = statistics.fmean(work.request(random.Random(99)).patches for _ in range(2000))
    towers = {"eager": tower}
    if cuda:
        towers["graphs"] = GraphedTower(tower, max_batch=4, budget_bytes=args.graph_budget_mib << 20)
    rows = []
    for load, seconds, modes in ((1.5, args.overload_seconds, ("coalescer",)),
                                 (0.1, args.light_seconds, ("per_item", "coalescer"))):
        rate = load * best["patches_per_s"] / mean_patches
        trace = gb.make_trace(work, rate, seconds, seed=int(load * 1000))
        for variant, t in towers.items():
            for inflight in (2, 3) if load > 1 else (2,):
                for mode in modes:
                    if mode == "per_item" and (variant != "eager" or inflight != 2):
                        continue
                    config = CoalescerConfig(max_wait_ms=2.0, max_batch_items=64, budget_bytes=budget_bytes,
                                             bytes_per_patch=bpp, max_queue_patches=10**8, dedup=False,
                                             max_inflight_batches=inflight, name=f"mixed-{variant}")
                    meter = gb.MeteredTower(t)
                    warm = work.warmup() * 2  # twice: graphs capture at the second use of a shape
                    r = asyncio.run(gb.run_mode(mode, meter, trace, seconds, args.drain_seconds, config, warm))
                    row = {"load": load, "mode": mode, "tower": variant, "inflight": inflight,
                           "requests": r["requests"], "unfinished": r["unfinished"],
                           "ratio_to_offline_best": r["patches_per_s"] / best["patches_per_s"],
                           "steady_ratio": r["steady_patches_per_s"] / best["patches_per_s"],
                           "p50_single_ms": r["p50_single_ms"], "p99_single_ms": r["p99_single_ms"],
                           "patches_per_forward": r["mean_patches_per_forward"]}
                    rows.append(row)
                    log(f"mixed load {load:.0%} {mode} {variant} inflight {inflight}: "
                        f"{row['ratio_to_offline_best']:.3f}x best, p50 single {row['p50_single_ms']:.2f} ms")
    direct = next(r for r in rows if r["load"] == 0.1 and r["mode"] == "per_item")["p50_single_ms"]
    for r in rows:
        if r["load"] == 0.1 and r["mode"] == "coalescer":
            r["p50_excess_vs_direct_ms"] = r["p50_single_ms"] - direct
    over = [r for r in rows if r["load"] > 1]
    targets = {"overload_ratio_" + f"{r['tower']}_inflight{r['inflight']}": r["ratio_to_offline_best"] for r in over}
    targets["overload_ok"] = max(r["ratio_to_offline_best"] for r in over) >= 0.97
    light = [r for r in rows if "p50_excess_vs_direct_ms" in r]
    targets.update({f"light_p50_excess_{r['tower']}_ms": r["p50_excess_vs_direct_ms"] for r in light})
    targets["light_ok"] = min(r["p50_excess_vs_direct_ms"] for r in light) <= 0.0
    return {"offline": sweep, "limit": {k: best[k] for k in ("batch", "patches_per_s")}, "rows": rows,
            "targets": targets}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny towers on CPU, few reps (CI)")
    p.add_argument("--tower", action="append", choices=LONE_TOWERS, help="lone-request towers (default: all)")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--graph-reps", type=int, default=30)
    p.add_argument("--graph-budget-mib", type=int, default=512)
    p.add_argument("--budget-mib", type=int, default=1024)
    p.add_argument("--sweep-seconds", type=float, default=0.6)
    p.add_argument("--overload-seconds", type=float, default=4.0)
    p.add_argument("--light-seconds", type=float, default=10.0)
    p.add_argument("--drain-seconds", type=float, default=1.5)
    p.add_argument("--cudnn-sdpa", action="store_true", help="keep cuDNN SDPA (it builds a graph per new shape)")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.reps, args.graph_reps = "cpu", min(args.reps, 12), 2
        args.sweep_seconds, args.overload_seconds, args.light_seconds, args.drain_seconds = 0.05, 0.3, 0.4, 0.2
        args.budget_bytes = 12 << 10  # tiny towers (<= 36 patches x 256 B): caps the offline sweep early
    else:
        args.budget_bytes = args.budget_mib << 20
    args.tiny = args.smoke
    if not args.cudnn_sdpa and torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    device = resolve(args.device)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "device": device_name(device), "torch": torch.__version__,
                              "args": vars(args), "lone": {}}
    path = Path(args.out) / ("encoder_gaps.json" if device.type == "cuda" else "encoder_gaps_smoke.json")
    for name in args.tower or LONE_TOWERS:
        report["lone"][name] = asyncio.run(lone(name, args, device))
        write_json(path, report)
    if device.type == "cuda":
        report["graph_vs_eager"] = graph_vs_eager(args, device)
    else:
        report["graph_vs_eager"] = "skipped: CUDA graphs need a CUDA device"
        log("graph vs eager: skipped (CUDA graphs need a CUDA device; the lone and load runs are eager only)")
    write_json(path, report)
    report["mixed"] = mixed_loads(args, device)
    report["seconds"] = time.perf_counter() - t_start
    write_json(path, report)
    print_tables(report)
    log(f"wrote {path} in {report['seconds']:.0f} s")
    return 0


def print_tables(report: dict[str, Any]) -> None:
    rows = []
    for name, r in report["lone"].items():
        for key, v in r["paths"].items():
            ci = v.get("excess_ci95_ms")
            rows.append({"tower": name, "path": key, **v, "ci": f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-"})
    print(f"\n== lone request ({report['device']}), median of paired rounds")
    print(format_table(rows, [("tower", "tower", ""), ("path", "path", ""), ("median_ms", "ms", ".2f"),
                              ("excess_ms", "excess", "+.2f"), ("ci", "95% CI", ""),
                              ("ratio_to_direct", "x direct", ".3f"), ("to_forward_ms", "to fwd", ".2f"),
                              ("forward_host_ms", "fwd host", ".2f"), ("after_forward_ms", "after fwd", ".2f")]))
    if isinstance(report["graph_vs_eager"], list):
        print("\n== SigLIP graph vs eager")
        print(format_table([r for r in report["graph_vs_eager"] if r["batch"] != "stats"],
                           [("batch", "batch", ""), ("eager_ms", "eager ms", ".2f"), ("graph_ms", "graph ms", ".2f"),
                            ("speedup", "speedup", ".2f"), ("identical", "identical", ""),
                            ("max_rel_err", "max rel err", ".1e")]))
    else:
        print(f"\n== graph vs eager: {report['graph_vs_eager']}")
    m = report["mixed"]
    print(f"\n== siglip-mixed under load (offline best {m['limit']['patches_per_s']:.0f} patches/s at batch "
          f"{m['limit']['batch']})")
    print(format_table(m["rows"], [("load", "load", ".0%"), ("mode", "mode", ""), ("tower", "tower", ""),
                                   ("inflight", "inflight", ""), ("ratio_to_offline_best", "x best", ".3f"),
                                   ("steady_ratio", "steady", ".3f"), ("p50_single_ms", "p50 single", ".2f"),
                                   ("p50_excess_vs_direct_ms", "vs direct", "+.2f"),
                                   ("patches_per_forward", "patch/fwd", ".0f"), ("unfinished", "unfin", "")]))
    print(f"targets: {m['targets']}")


if __name__ == "__main__":
    sys.exit(main())
