"""GPU benchmark of the coalescer against direct encoding, on real transformers towers.

For each tower: calibrate bytes/patch, measure one direct forward, sweep offline batch sizes for
the best-batch throughput (the limit), then replay one open-loop Poisson trace of single-image,
multi-image (and, for Qwen2.5-VL, video) requests at 10/50/90/150 % of that limit through
  (a) per_item:    one forward per item, served FIFO by one forward thread,
  (b) per_request: one forward per request with the request's items batched,
  (c) coalescer:   mm_scheduler.Coalescer with the measured bytes/patch and a byte budget.
Then the overlap experiment: a stand-in LLM decode loop on its own stream while encoding.

    python -m benchmarks.gpu_bench --all --device cuda --out benchmarks/results
    python -m benchmarks.gpu_bench --tower siglip --device cpu --tiny --step-seconds 0.3   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import queue
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import TowerWrapper, build_bench_tower, log, pct, poisson_trace, stream_ctx
from mm_scheduler import Coalescer, CoalescerConfig, EncodeItem
from mm_scheduler.calibrate import calibrate, calibrate_tower
from mm_scheduler.towers import build_tower
from mm_scheduler.units import split_into_units

LOADS = (0.1, 0.5, 0.9, 1.5)
BATCHES = (1, 2, 4, 8, 16, 32, 64)
MODES = ("per_item", "per_request", "coalescer")


# --- workload --------------------------------------------------------------------------------
@dataclass
class Request:
    items: list[EncodeItem]
    patches: int
    units: int

    @property
    def single(self) -> bool:
        return len(self.items) == 1 and self.items[0].modality == "image"


class Workload:
    """Random requests over a fixed pool of pinned pixel tensors (generating pixels per request would
    cost more host time than the encoder takes)."""

    def __init__(self, name: str, tower: Any, tiny: bool, seed: int = 0) -> None:
        self.name, self.tower = name, tower
        pin = tower.device.type == "cuda"
        gen = torch.Generator().manual_seed(seed)
        self.pool: dict[Any, list[torch.Tensor]] = {}
        if name == "qwen2_5_vl":
            self.grids = [(8, 8), (8, 12)] if tiny else [(16, 16), (24, 24), (32, 32), (20, 36), (36, 20)]
            self.video = ((4, 4), 3) if tiny else ((16, 16), 8)  # (grid, temporal slices)
            for g in self.grids:
                self.pool[g] = [tower.make_pixels(*g, pin=pin, generator=gen) for _ in range(4)]
            (vh, vw), slices = self.video
            self.pool["video"] = [tower.make_pixels(vh, vw, slices, pin=pin, generator=gen) for _ in range(2)]
        else:
            self.resolutions = tower.resolutions
            for r in self.resolutions:
                self.pool[r] = [tower.make_pixels(r, pin=pin, generator=gen) for _ in range(8)]

    def image(self, rng: random.Random) -> EncodeItem:
        if self.name == "qwen2_5_vl":
            g = rng.choice(self.grids)
            return EncodeItem(rng.choice(self.pool[g]), g[0] * g[1], meta={"grid_hw": g})
        r = rng.choice(self.resolutions)
        return EncodeItem(rng.choice(self.pool[r]), self.tower.patches_for(r))

    def request(self, rng: random.Random) -> Request:
        """60 % one image, 40 % 2-4 images; Qwen: 50 % one image, 30 % 2-3 images, 20 % a video."""
        u = rng.random()
        if self.name == "qwen2_5_vl":
            if u < 0.2:
                vh, vw = self.video[0]
                items = [EncodeItem(rng.choice(self.pool["video"]), vh * vw, "video", meta={"grid_hw": (vh, vw)})]
            else:
                items = [self.image(rng) for _ in range(1 if u < 0.7 else rng.randint(2, 3))]
        else:
            items = [self.image(rng) for _ in range(1 if u < 0.6 else rng.randint(2, 4))]
        units = sum(it.pixel_values.shape[0] if it.modality == "video" else 1 for it in items)
        patches = sum(it.num_patches * (it.pixel_values.shape[0] if it.modality == "video" else 1) for it in items)
        return Request(items, patches, units)

    def batch(self, rng: random.Random, size: int, budget_patches: int, index: int) -> list[EncodeItem]:
        """Up to ``size`` units within the budget, as the coalescer would batch them: mixed sizes for
        ragged towers; otherwise one resolution, taken round-robin by ``index`` so that a set of
        batches holds each resolution equally often, like the request mix."""
        if self.tower.ragged:
            units: list[EncodeItem] = []
            while len(units) < size:
                unit = self.image(rng)
                if units and sum(u.num_patches for u in units) + unit.num_patches > budget_patches:
                    break
                units.append(unit)
            return units
        r = self.resolutions[index % len(self.resolutions)]
        per = self.tower.patches_for(r)
        return [EncodeItem(rng.choice(self.pool[r]), per) for _ in range(max(1, min(size, budget_patches // per)))]


    def warmup(self) -> list[Request]:
        """One request per input size (and a video), so first-use costs stay out of the measurement."""
        rng = random.Random(7)
        if self.name == "qwen2_5_vl":
            reqs = [Request([EncodeItem(self.pool[g][0], g[0] * g[1], meta={"grid_hw": g})], g[0] * g[1], 1)
                    for g in self.grids]
            while not any(it.modality == "video" for r in reqs for it in r.items):
                reqs.append(self.request(rng))
            return reqs
        return [Request([EncodeItem(self.pool[r][0], self.tower.patches_for(r))], self.tower.patches_for(r), 1)
                for r in self.resolutions]


# --- measurement helpers -----------------------------------------------------------------------
class MeteredTower(TowerWrapper):
    """Wraps a tower to record, per forward, its patch count and allocator peak above the baseline.

    The allocator's counters are host-side bookkeeping, so reading them needs no sync."""

    def __init__(self, tower: Any) -> None:
        super().__init__(tower)
        self.cuda = tower.device.type == "cuda"
        self.forwards: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def forward(self, units: Sequence[EncodeItem]) -> Sequence[torch.Tensor]:
        with self.lock:
            if self.cuda:
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            out = self.inner.forward(units)
            peak = torch.cuda.max_memory_allocated(self.device) - base if self.cuda else 0
            self.forwards.append((sum(u.num_patches for u in units), peak))
        return out

    def reset(self) -> None:
        self.forwards = []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def single_forward_ms(tower: Any, items: list[EncodeItem], stream: torch.cuda.Stream | None, reps: int) -> float:
    """Median wall time of one unbatched forward incl. H2D and completion: the direct-encode floor."""
    times = []
    with stream_ctx(stream), torch.inference_mode():
        for i in range(reps + 3):
            t = time.perf_counter()
            tower.forward([items[i % len(items)]])
            sync(tower.device)
            if i >= 3:
                times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


async def lone_latency(tower: Any, items: list[EncodeItem], stream: torch.cuda.Stream | None,
                       config: CoalescerConfig, reps: int) -> dict[str, float]:
    """One request at a time, no queueing: direct forward vs the same item through the coalescer.

    Interleaved pairs, so drift in host speed hits both alike; the difference is what the coalescer
    adds to a lone request (the hand-offs between loop, forward thread and event waiter)."""
    direct, coalesced = [], []
    async with Coalescer(tower, config) as co:
        for i in range(reps + 3):
            item = items[i % len(items)]
            t = time.perf_counter()
            with stream_ctx(stream), torch.inference_mode():
                tower.forward([item])
                sync(tower.device)
            d = time.perf_counter() - t
            t = time.perf_counter()
            await co.encode([item])
            c = time.perf_counter() - t
            if i >= 3:
                direct.append(d * 1e3)
                coalesced.append(c * 1e3)
    diffs = [c - d for c, d in zip(coalesced, direct, strict=True)]
    return {"direct_ms": statistics.median(direct), "coalescer_ms": statistics.median(coalesced),
            "median_excess_ms": statistics.median(diffs), "reps": reps}


def offline_sweep(tower: Any, work: Workload, budget_patches: int, stream: torch.cuda.Stream | None,
                  seconds: float) -> list[dict[str, Any]]:
    """Back-to-back forwards of fixed-size batches (no per-batch sync): the best a batcher can do."""
    rng = random.Random(1)
    rows = []
    sets = 2 * (1 if tower.ragged else len(work.resolutions))
    for size in BATCHES:
        batches = [work.batch(rng, size, budget_patches, i) for i in range(max(8, sets))]
        if rows and max(len(b) for b in batches) <= rows[-1]["batch"]:
            break  # the budget already caps every batch at the previous size
        with stream_ctx(stream), torch.inference_mode():
            for b in batches:  # warm every shape: first launches load kernels
                tower.forward(b)
            sync(tower.device)
            if tower.device.type == "cuda":
                base = torch.cuda.memory_allocated(tower.device)
                torch.cuda.reset_peak_memory_stats(tower.device)
            n = units = patches = 0
            t0 = time.perf_counter()
            while True:
                b = batches[n % len(batches)]
                tower.forward(b)
                n += 1
                units += len(b)
                patches += sum(u.num_patches for u in b)
                if n % len(batches) == 0:  # whole sets only, so every resolution counts equally
                    sync(tower.device)
                    if time.perf_counter() - t0 >= seconds:
                        break
            dt = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(tower.device) - base if tower.device.type == "cuda" else 0
        rows.append({"batch": size, "mean_units_per_forward": units / n, "forwards": n,
                     "units_per_s": units / dt, "patches_per_s": patches / dt,
                     "ms_per_forward": dt / n * 1e3, "peak_bytes_per_forward_upper": peak})
        log(f"  offline batch {size:3d}: {units / dt:8.1f} units/s  {patches / dt:10.0f} patches/s")
    return rows


# --- serving modes ------------------------------------------------------------------------------
class SerialServer:
    """One forward thread, FIFO: the naive direct server of modes (a) and (b)."""

    def __init__(self, tower: MeteredTower, loop: asyncio.AbstractEventLoop) -> None:
        self.tower, self.loop = tower, loop
        self.stream = torch.cuda.Stream(tower.device) if tower.cuda else None
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.stopping = False
        self.thread = threading.Thread(target=self._work, daemon=True)
        self.thread.start()

    def submit(self, units: list[EncodeItem]) -> asyncio.Future:
        fut = self.loop.create_future()
        self.jobs.put((units, fut))
        return fut

    def _work(self) -> None:
        if self.tower.cuda:
            torch.cuda.set_device(self.tower.device)
        while (job := self.jobs.get()) is not None:
            units, fut = job
            if self.stopping or fut.cancelled():
                continue
            with stream_ctx(self.stream), torch.inference_mode():
                out = self.tower.forward(units)
                if self.stream is not None:
                    done = torch.cuda.Event()
                    done.record()
                    done.synchronize()
            self.loop.call_soon_threadsafe(_resolve, fut, out)

    def close(self) -> None:
        self.stopping = True
        self.jobs.put(None)
        self.thread.join()


def _resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


@dataclass
class Outcome:
    arrival: float
    request: Request
    finish: float | None = None


async def replay(trace: list[tuple[float, Request]], handle: Callable[[Request], Any], duration: float,
                 drain: float) -> tuple[list[Outcome], float]:
    """Open loop: fire each request at its arrival time regardless of completions; stop at duration + drain."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    outcomes: list[Outcome] = []
    tasks = []

    async def one(o: Outcome) -> None:
        await handle(o.request)
        o.finish = loop.time()

    for at, req in trace:
        delay = t0 + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        o = Outcome(t0 + at, req)
        outcomes.append(o)
        tasks.append(asyncio.ensure_future(one(o)))
    remaining = t0 + duration + drain - loop.time()
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, remaining))
    end = loop.time()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return outcomes, end - t0


def summarize(outcomes: list[Outcome], span: float, duration: float, meter: MeteredTower,
              budget_bytes: int | None) -> dict[str, Any]:
    """Throughput two ways: over the whole busy period (ramp-up included), and ``steady``: completions
    while arrivals still run, after the first 20 % of the trace (the service rate once queues formed)."""
    done = [o for o in outcomes if o.finish is not None]
    end = max((o.finish for o in done), default=0.0)
    t0 = min((o.arrival for o in outcomes), default=0.0)
    busy = (end - t0) if done else span
    cut = t0 + span
    lat = [((o.finish if o.finish is not None else cut) - o.arrival) * 1e3 for o in outcomes]
    single = [((o.finish if o.finish is not None else cut) - o.arrival) * 1e3 for o in outcomes if o.request.single]
    forwards = meter.forwards
    peaks = [p for _, p in forwards]
    lo, hi = t0 + 0.2 * duration, t0 + duration
    steady = sum(o.request.patches for o in done if lo <= o.finish < hi) / (hi - lo)
    out = {
        "requests": len(outcomes), "completed": len(done), "unfinished": len(outcomes) - len(done),
        "patches_per_s": sum(o.request.patches for o in done) / busy if busy > 0 else 0.0,
        "units_per_s": sum(o.request.units for o in done) / busy if busy > 0 else 0.0,
        "steady_patches_per_s": steady,
        "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "mean_ms": statistics.fmean(lat) if lat else float("nan"),
        "p50_single_ms": pct(single, 50), "p99_single_ms": pct(single, 99),
        "forwards": len(forwards),
        "mean_patches_per_forward": statistics.fmean(p for p, _ in forwards) if forwards else 0.0,
        "max_patches_per_forward": max((p for p, _ in forwards), default=0),
        "max_forward_peak_bytes": max(peaks, default=0),
    }
    if budget_bytes is not None:
        out["budget_bytes"] = budget_bytes
        out["peak_within_budget"] = out["max_forward_peak_bytes"] <= budget_bytes
    return out


async def run_mode(mode: str, meter: MeteredTower, trace: list[tuple[float, Request]], duration: float,
                   drain: float, config: CoalescerConfig, warmup: list[Request]) -> dict[str, Any]:
    """Serve ``trace`` one way; ``warmup`` requests run first, off the record (new thread, stream, handles)."""
    loop = asyncio.get_running_loop()
    if mode == "coalescer":
        async with Coalescer(meter, config) as co:
            await asyncio.gather(*(co.encode(r.items) for r in warmup))
            meter.reset()
            outcomes, span = await replay(trace, lambda r: co.encode(r.items), duration, drain)
            stats = co.stats()
        res = summarize(outcomes, span, duration, meter, co.budget_bytes)
        res["coalescer_stats"] = {k: stats[k] for k in ("budget_patches", "bytes_per_patch", "oom_backoffs")}
        return res
    server = SerialServer(meter, loop)
    try:
        if mode == "per_item":
            async def handle(r: Request) -> None:
                await asyncio.gather(*(server.submit(split_into_units([it])[0]) for it in r.items))
        else:
            async def handle(r: Request) -> None:
                await server.submit(split_into_units(r.items)[0])
        await asyncio.gather(*(handle(r) for r in warmup))
        meter.reset()
        outcomes, span = await replay(trace, handle, duration, drain)
    finally:
        server.close()
    sync(meter.device)
    return summarize(outcomes, span, duration, meter, None)


def make_trace(work: Workload, rate: float, duration: float, seed: int) -> list[tuple[float, Request]]:
    return poisson_trace(work.request, rate, duration, seed)


# --- one tower ---------------------------------------------------------------------------------
def bench_tower(name: str, args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tower = build_bench_tower(name, device, tiny=args.tiny)
    work = Workload(name, tower, args.tiny)
    result: dict[str, Any] = {"tower": name, "formula_bytes_per_patch": tower.bytes_per_patch}
    if name == "qwen2_5_vl":
        result["attention"] = tower.attention

    if cuda:
        cal = calibrate(tower, tower.probe_units, tower.probe_patch_counts, margin=args.margin)
        bpp = cal.bytes_per_patch
        result["calibration"] = {"patches": cal.patches, "peak_bytes": cal.peak_bytes, "slope": cal.slope,
                                 "intercept": cal.intercept, "margin": cal.margin, "bytes_per_patch": bpp,
                                 "measured_per_patch_at_largest": cal.peak_bytes[-1] / cal.patches[-1]}
        log(f"{name}: calibrated {bpp} B/patch (slope {cal.slope:.0f}, formula {tower.bytes_per_patch})")
    else:
        bpp = tower.bytes_per_patch
    budget_bytes = args.budget_mib << 20
    budget_patches = budget_bytes // bpp
    result.update(bytes_per_patch=bpp, budget_bytes=budget_bytes, budget_patches=budget_patches)

    stream = torch.cuda.Stream(device) if cuda else None
    rng = random.Random(2)
    singles = [work.image(rng) for _ in range(8)]
    if name == "siglip-mixed":
        native = [u for u in singles if u.num_patches == tower.patches_for(384)] or singles
    else:
        native = singles
    result["single_forward_ms"] = single_forward_ms(tower, native, stream, args.reps)
    log(f"{name}: single forward {result['single_forward_ms']:.2f} ms")
    config = CoalescerConfig(max_wait_ms=args.max_wait_ms, max_batch_items=args.max_batch_items,
                             budget_bytes=budget_bytes, bytes_per_patch=bpp, max_queue_patches=10**8,
                             dedup=False, name=name)
    result["lone"] = asyncio.run(lone_latency(tower, singles, stream, config, args.reps))
    log(f"{name}: lone request {result['lone']}")
    if args.lone_only:
        return result

    sweep = offline_sweep(tower, work, budget_patches, stream, args.sweep_seconds)
    best = max(sweep, key=lambda r: r["patches_per_s"])
    result["offline"] = sweep
    result["limit"] = {k: best[k] for k in ("batch", "patches_per_s", "units_per_s")}

    sample = random.Random(99)
    mean_req_patches = statistics.fmean(work.request(sample).patches for _ in range(4000))
    result["mean_request_patches"] = mean_req_patches
    meter = MeteredTower(tower)
    loads = []
    for frac in LOADS:
        rate = frac * best["patches_per_s"] / mean_req_patches
        duration = min(args.step_seconds * 2, max(args.step_seconds, args.min_requests / rate))
        trace = make_trace(work, rate, duration, seed=int(frac * 1000))
        row: dict[str, Any] = {"load": frac, "offered_patches_per_s": frac * best["patches_per_s"],
                               "realized_offered_patches_per_s": sum(r.patches for _, r in trace) / duration,
                               "offered_requests_per_s": rate, "duration_s": duration, "requests": len(trace),
                               "modes": {}}
        for mode in MODES:
            res = asyncio.run(run_mode(mode, meter, trace, duration, args.drain_seconds, config, work.warmup()))
            row["modes"][mode] = res
            log(f"{name} load {frac:4.0%} {mode:11s}: {res['patches_per_s']:9.0f} patches/s "
                f"({res['patches_per_s'] / best['patches_per_s']:.2f}x limit)  p50 {res['p50_ms']:8.2f} ms  "
                f"p99 {res['p99_ms']:8.2f} ms  p50(single) {res['p50_single_ms']:7.2f} ms  "
                f"patches/fwd {res['mean_patches_per_forward']:7.0f}  unfinished {res['unfinished']}")
        loads.append(row)
    result["loads"] = loads
    result["targets"] = targets(result)
    if cuda:
        result["max_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    del tower, meter, work
    if cuda:
        torch.cuda.empty_cache()
    return result


def targets(r: dict[str, Any]) -> dict[str, Any]:
    by_load = {row["load"]: row["modes"] for row in r["loads"]}
    over = by_load[max(by_load)]["coalescer"]["patches_per_s"] / r["limit"]["patches_per_s"]
    over_steady = by_load[max(by_load)]["coalescer"]["steady_patches_per_s"] / r["limit"]["patches_per_s"]
    low = by_load[min(by_load)]
    co_p50 = low["coalescer"]["p50_single_ms"]
    direct_p50 = low["per_item"]["p50_single_ms"]
    peaks = [m["max_forward_peak_bytes"] for row in r["loads"] for m in row["modes"].values()]
    return {
        "overload_throughput_ratio": over, "overload_steady_throughput_ratio": over_steady,
        "overload_ok": over >= 0.95,
        "low_load_p50_single_ms": co_p50, "direct_p50_single_ms": direct_p50,
        "single_forward_ms": r["single_forward_ms"],
        "low_load_p50_excess_ms": co_p50 - direct_p50, "low_load_ok": co_p50 <= direct_p50 + 0.5,
        "low_load_excess_vs_single_forward_ms": co_p50 - r["single_forward_ms"],
        "lone_excess_ms": r["lone"]["median_excess_ms"], "lone_ok": r["lone"]["median_excess_ms"] <= 0.5,
        "max_forward_peak_bytes": max(peaks), "budget_bytes": r["budget_bytes"],
        "peak_ok": max(peaks) <= r["budget_bytes"],
    }


# --- overlap: encoder next to an LLM decode loop --------------------------------------------
class DecodeLoop:
    """Stand-in LLM decode step: ``layers`` x (x @ W_up [4096x28672], gated, @ W_down [14336x4096])
    at batch 64, weights cycled over 4 distinct layers so they stream from HBM like a real 8B step."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream, layers: int = 32, batch: int = 64) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        self.device, self.stream, self.layers = device, stream, layers
        self.w_up = [torch.randn(4096, 28672, device=device, dtype=torch.bfloat16, generator=g) * 0.01
                     for _ in range(4)]
        self.w_down = [torch.randn(14336, 4096, device=device, dtype=torch.bfloat16, generator=g) * 0.01
                       for _ in range(4)]
        self.x = torch.randn(batch, 4096, device=device, dtype=torch.bfloat16, generator=g)
        self.inline: Callable[[], None] | None = None

    def step(self) -> None:
        x = self.x
        for i in range(self.layers):
            h = x @ self.w_up[i % 4]
            x = (torch.nn.functional.silu(h[:, :14336]) * h[:, 14336:]) @ self.w_down[i % 4]

    def run(self, seconds: float, stop: threading.Event | None = None) -> list[float]:
        """Steps until ``seconds`` pass; each step is synchronized, as an engine's sampling step is."""
        torch.cuda.set_device(self.device)
        times = []
        end = time.perf_counter() + seconds
        with torch.cuda.stream(self.stream), torch.inference_mode():
            while time.perf_counter() < end and not (stop and stop.is_set()):
                t = time.perf_counter()
                if self.inline is not None:
                    self.inline()
                self.step()
                self.stream.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
        return times


def step_stats(times: list[float]) -> dict[str, float]:
    return {"steps": len(times), "median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "p99_ms": pct(times, 99)}


async def closed_loop_encode(co: Coalescer, work: Workload, clients: int, seconds: float) -> int:
    """``clients`` callers each sending single-image requests back to back; returns images encoded."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    done = 0

    async def client(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        while loop.time() < end:
            await co.encode([work.image(rng)])
            done += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return done


def bench_overlap(args: argparse.Namespace) -> dict[str, Any]:
    """LLM step time and encode throughput: alone, on separate streams (coalescer), on one stream (inline)."""
    tower = build_tower("siglip", args.device)
    device = tower.device
    work = Workload("siglip", tower, tiny=False)
    seconds = args.overlap_seconds
    llm_stream = torch.cuda.Stream(device)
    llm = DecodeLoop(device, llm_stream)
    llm.run(0.5)
    res: dict[str, Any] = {"llm_alone": step_stats(llm.run(seconds))}
    log(f"overlap: llm alone {res['llm_alone']}")
    config = CoalescerConfig(max_wait_ms=args.max_wait_ms, max_batch_items=32, budget_bytes=args.budget_mib << 20,
                             bytes_per_patch=calibrate_tower(tower, args.margin), dedup=False, name="overlap")

    async def encode_only() -> float:
        async with Coalescer(tower, config) as co:
            await closed_loop_encode(co, work, 64, 0.5)
            n = await closed_loop_encode(co, work, 64, seconds)
        return n / seconds

    res["encode_alone_images_per_s"] = asyncio.run(encode_only())
    log(f"overlap: encode alone {res['encode_alone_images_per_s']:.1f} img/s")

    for label, prio in (("separate_streams", 0), ("separate_streams_llm_high_priority", -1)):
        llm.stream = torch.cuda.Stream(device, priority=prio)

        async def both() -> tuple[float, list[float]]:
            async with Coalescer(tower, config) as co:
                await closed_loop_encode(co, work, 64, 0.3)
                box: dict[str, list[float]] = {}
                th = threading.Thread(target=lambda: box.setdefault("t", llm.run(seconds)))
                th.start()
                n = await closed_loop_encode(co, work, 64, seconds)
                await asyncio.get_running_loop().run_in_executor(None, th.join)
            return n / seconds, box["t"]

        rate, times = asyncio.run(both())
        res[label] = {"llm": step_stats(times), "encode_images_per_s": rate}
        log(f"overlap: {label}: {res[label]}")

    # One stream: the engine encodes inline between decode steps (each step takes what arrived, up to 32 images).
    llm.stream = llm_stream
    pending: queue.SimpleQueue = queue.SimpleQueue()
    encoded = [0]

    def inline() -> None:
        units = []
        while len(units) < 32:
            try:
                units.append(pending.get_nowait())
            except queue.Empty:
                break
        if units:
            tower.forward(units)
            encoded[0] += len(units)

    rng = random.Random(5)
    stop = threading.Event()

    def feeder() -> None:  # keeps a backlog like saturating clients would
        while not stop.is_set():
            if pending.qsize() < 64:
                pending.put(work.image(rng))
            else:
                time.sleep(0.0005)

    feed = threading.Thread(target=feeder, daemon=True)
    feed.start()
    llm.inline = inline
    llm.run(0.3)
    encoded[0] = 0
    times = llm.run(seconds)
    stop.set()
    feed.join()
    llm.inline = None
    res["one_stream_inline"] = {"llm": step_stats(times), "encode_images_per_s": encoded[0] / seconds}
    log(f"overlap: one stream inline: {res['one_stream_inline']}")
    base = res["llm_alone"]["median_ms"]
    for key in ("separate_streams", "separate_streams_llm_high_priority", "one_stream_inline"):
        res[key]["step_inflation_median"] = res[key]["llm"]["median_ms"] / base
        res[key]["step_inflation_mean"] = res[key]["llm"]["mean_ms"] / res["llm_alone"]["mean_ms"]
    return res


# --- main ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tower", action="append", choices=["siglip", "siglip-mixed", "qwen2_5_vl"])
    p.add_argument("--all", action="store_true", help="every tower plus the overlap experiment")
    p.add_argument("--overlap", action="store_true", help="run the overlap experiment (CUDA only)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny random configs (CPU smoke test)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--budget-mib", type=int, default=1024)
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument("--step-seconds", type=float, default=3.0)
    p.add_argument("--min-requests", type=int, default=150)
    p.add_argument("--drain-seconds", type=float, default=1.5)
    p.add_argument("--sweep-seconds", type=float, default=0.6)
    p.add_argument("--overlap-seconds", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--lone-only", action="store_true", help="per tower: only the lone-request latency")
    p.add_argument("--no-cudnn-sdpa", action="store_true",
                   help="disable the cuDNN SDPA backend: it builds a graph per new shape per thread")
    args = p.parse_args(argv)
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    towers = ["siglip", "siglip-mixed", "qwen2_5_vl"] if args.all else (args.tower or [])
    overlap = (args.all or args.overlap) and torch.device(args.device).type == "cuda"
    if not towers and not overlap:
        p.error("name --tower, --overlap or --all")
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    import transformers

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args),
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "towers": {},
    }
    stem = "lone" if args.lone_only else "gpu_bench" if args.device.startswith("cuda") else "cpu_smoke"
    path = out_dir / f"{stem}.json"
    for name in towers:
        report["towers"][name] = bench_tower(name, args)
        path.write_text(json.dumps(report, indent=1))
    if overlap:
        report["overlap"] = bench_overlap(args)
    path.write_text(json.dumps(report, indent=1))
    if args.lone_only:
        for name, r in report["towers"].items():
            print(f"{name}: lone request {r['lone']}")
        return 0
    print_table(report)
    log(f"wrote {path}")
    return 0


def print_table(report: dict[str, Any]) -> None:
    for name, r in report["towers"].items():
        t = r["targets"]
        lim = r["limit"]
        print(f"\n== {name}: limit {lim['patches_per_s']:.0f} patches/s ({lim['units_per_s']:.1f} units/s, "
              f"batch {lim['batch']}); bytes/patch {r['bytes_per_patch']} (formula {r['formula_bytes_per_patch']}); "
              f"single forward {r['single_forward_ms']:.2f} ms")
        print(f"{'load':>5} {'mode':>12} {'patch/s':>9} {'steady':>9} {'xlimit':>6} {'p50ms':>8} {'p99ms':>8} "
              f"{'p50single':>9} {'patch/fwd':>9} {'peakMiB':>8} {'unfin':>5}")
        for row in r["loads"]:
            for mode, m in row["modes"].items():
                print(f"{row['load']:5.0%} {mode:>12} {m['patches_per_s']:9.0f} {m['steady_patches_per_s']:9.0f} "
                      f"{m['patches_per_s'] / r['limit']['patches_per_s']:6.2f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} "
                      f"{m['p50_single_ms']:9.2f} {m['mean_patches_per_forward']:9.0f} "
                      f"{m['max_forward_peak_bytes'] / 2**20:8.1f} {m['unfinished']:5d}")
        print(f"targets: overload {t['overload_throughput_ratio']:.3f}x "
              f"(steady {t['overload_steady_throughput_ratio']:.3f}x; >=0.95: {t['overload_ok']}); low-load p50 "
              f"excess {t['low_load_p50_excess_ms']:+.2f} ms (<=0.5: {t['low_load_ok']}); peak "
              f"{t['max_forward_peak_bytes'] / 2**20:.1f} MiB <= budget {t['budget_bytes'] / 2**20:.0f} MiB: "
              f"{t['peak_ok']}; lone request +{t['lone_excess_ms']:.2f} ms (<=0.5: {t['lone_ok']})")
    if "overlap" in report:
        o = report["overlap"]
        print(f"\n== overlap: llm step alone {o['llm_alone']['median_ms']:.2f} ms; encode alone "
              f"{o['encode_alone_images_per_s']:.1f} img/s")
        for key in ("separate_streams", "separate_streams_llm_high_priority", "one_stream_inline"):
            v = o[key]
            print(f"{key:36s} step median {v['llm']['median_ms']:.2f} ms (x{v['step_inflation_median']:.2f}), "
                  f"mean {v['llm']['mean_ms']:.2f} (x{v['step_inflation_mean']:.2f}), p99 {v['llm']['p99_ms']:.2f}; "
                  f"encode {v['encode_images_per_s']:.1f} img/s")


if __name__ == "__main__":
    sys.exit(main())
