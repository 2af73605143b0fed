"""EPD encoder server: mm-scheduler's coalescing path vs SGLang's ``EncoderScheduler`` batching policy.

One real Qwen2.5-VL vision tower (random weights, TP=1) and transformers' real Qwen2-VL image and
video processors serve an open-loop Poisson trace of requests (50 % one image, 30 % 2-3 images of
mixed resolution, 20 % one short video) through two front ends:

* ``sglang``: :class:`SGLangEncoderPolicy`, SGLang 0.5.23's ``EncoderScheduler`` batching policy
  (``disaggregation/encoder/runtime.py``) reproduced line for line as a small asyncio loop, because
  the GPU machine has no sglang/pyzmq: ``_collect_batch`` drains at most ``max_batch_size`` (8)
  queued requests, no window, no budget; video is dispatched per request; batches run one at a
  time; each batch preprocesses all its items in one processor call inside the batch, runs the
  forward on the event loop and copies the result to host with a blocking ``.cpu()``
  (:class:`BenchEncoder`, the ``MMEncoder.batch_encode`` analogue).
* ``coalescer``: as ``integration/epd.py`` drives it: each request is preprocessed at submit on a
  thread pool, its grid entries go to :class:`mm_scheduler.Coalescer` (patch-count budgeted,
  pipelined batches across requests, video slices batched with images) and the embedding is copied
  to pinned host memory with ``non_blocking=True``; the coalescer waits for that off the loop.

First both front ends get the same burst (saturation throughput; SGLang's is its capacity), then
the trace is replayed at 10/50/100/150 % of SGLang's capacity. With ``--smoke`` (CPU, tiny tower,
seconds) and sglang importable, the same requests also go through SGLang's real ``EncoderScheduler``
class to check that the reproduction forms the same batches.

    python -m benchmarks.epd_bench                      # GPU, ~2.5 min on one H200
    python -m benchmarks.epd_bench --smoke --out /tmp/epd_smoke.json
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.harness import (
    TowerWrapper,
    build_bench_tower,
    bytes_per_patch,
    device_name,
    format_table,
    latency_stats,
    log,
    markdown_table,
    poisson_trace,
    progress,
    resolve,
    write_json,
)
from mm_scheduler import Coalescer, CoalescerConfig, EncodeItem

LOADS = (0.1, 0.5, 1.0, 1.5)
MODES = ("sglang", "coalescer")
SGLANG_MAX_BATCH_SIZE = 8  # envs.SGLANG_ENCODER_MAX_BATCH_SIZE default (server.py:112)
OUT = Path("benchmarks/results/epd_bench.json")


# --- workload -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Raw (decoded, uint8 HWC) media pools: images of mixed sizes and short videos."""

    images: list[list[np.ndarray]]
    videos: list[np.ndarray]

    @classmethod
    def build(cls, tiny: bool, seed: int = 0) -> Workload:
        rng = np.random.default_rng(seed)
        # pixel sizes are multiples of 28, so the processor keeps them: 16x16..36x20 patch grids (GPU)
        sizes = [(112, 112), (112, 168)] if tiny else [(224, 224), (336, 336), (448, 448), (280, 504), (504, 280)]
        frames, side = (4, 56) if tiny else (16, 224)
        images = [[rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(4)] for h, w in sizes]
        videos = [rng.integers(0, 256, (frames, side, side, 3), dtype=np.uint8) for _ in range(2)]
        return cls(images, videos)

    def draw(self, rng: random.Random) -> tuple[str, list[np.ndarray]]:
        """(modality, mm_items): 20 % one video, 50 % one image, 30 % 2-3 images (as harness.MediaMix)."""
        u = rng.random()
        if u < 0.2:
            return "video", [rng.choice(self.videos)]
        return "image", [rng.choice(rng.choice(self.images)) for _ in range(1 if u < 0.7 else rng.randint(2, 3))]

    def warm_set(self) -> list[tuple[str, list[np.ndarray]]]:
        return [("image", [group[0]]) for group in self.images] + [("video", [self.videos[0]])]


class Preprocessor:
    """transformers' Qwen2-VL image/video processors (what SGLang's EncoderPreprocessor calls for Qwen2.5-VL)."""

    def __init__(self, dtype: torch.dtype) -> None:
        import transformers
        from transformers import Qwen2VLImageProcessor

        transformers.logging.set_verbosity_error()
        self.dtype = dtype
        try:
            self.image = Qwen2VLImageProcessor()
        except (ImportError, ValueError):  # no torchvision backend: the PIL/numpy one (same output)
            from transformers import Qwen2VLImageProcessorPil

            self.image = Qwen2VLImageProcessorPil()
        self.video: Any = None
        try:
            from transformers import Qwen2VLVideoProcessor

            self.video = Qwen2VLVideoProcessor()
        except (ImportError, ValueError) as exc:
            log(f"Qwen2VLVideoProcessor unavailable ({exc!r}): videos go through the image processor per frame")

    def __call__(self, modality: str, items: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """One processor call over ``items``: packed ``[rows, 1176]`` pixels (tower dtype) and (t, h, w) grids."""
        if modality == "video" and self.video is not None:
            out = self.video(videos=list(items), return_tensors="pt", do_sample_frames=False)
            pixels, grid = out["pixel_values_videos"], out["video_grid_thw"]
        elif modality == "video":  # fallback: every frame processed, one of each temporal pair kept
            parts, grids = [], []
            for video in items:
                out = self.image(images=list(video), return_tensors="pt")
                _, h, w = (int(v) for v in out["image_grid_thw"][0])
                parts.append(out["pixel_values"].view(len(video), h * w, -1)[::2].reshape(-1, out[
                    "pixel_values"].shape[-1]))
                grids.append((len(video) // 2, h, w))
            return torch.cat(parts).to(self.dtype), grids
        else:
            out = self.image(images=list(items), return_tensors="pt")
            pixels, grid = out["pixel_values"], out["image_grid_thw"]
        return pixels.to(self.dtype), [tuple(int(v) for v in g) for g in grid.tolist()]


def tower_units(pixels: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> list[EncodeItem]:
    """The tower's units of packed processor output: one per image / video temporal slice."""
    units, offset = [], 0
    for t, h, w in grids:
        for _ in range(t):
            units.append(EncodeItem(pixels[offset: offset + h * w], h * w, meta={"grid_hw": (h, w)}))
            offset += h * w
    return units


def llm_tokens(grids: Sequence[tuple[int, int, int]], merge: int = 2) -> int:
    return sum(t * h * w // (merge * merge) for t, h, w in grids)


# --- SGLang's EncoderScheduler policy, reproduced -----------------------------------------------
class BenchEncoder:
    """What ``EncoderScheduler`` calls on ``MMEncoder`` (server.py), over the bench tower and processor.

    ``batch_encode`` is ``MMEncoder.batch_encode`` (server.py:2229-2266) without caches or transfers:
    one processor call for the whole batch (``_prepare_encode_context`` -> ``process_batch_mm_items``,
    server.py:1139-1143, preprocessor.py:676-682; transformers' processor on ``preproc_executor``,
    awaited, preprocessor.py:735-738 images, 763-769 video), then the forward ON THE EVENT LOOP with a
    blocking ``.cpu()`` (``_compute_direct_embedding``, server.py:1761-1765), then a per-request split
    (``_stage_embeddings``, server.py:2132-2203). Works for the reproduction and SGLang's real class.
    """

    def __init__(self, tower: Any, preprocess: Preprocessor, preproc_workers: int = 1) -> None:
        self.tower = tower
        self.preprocess = preprocess
        self.encode_dispatch_lock = asyncio.Lock()
        self.preproc_executor = concurrent.futures.ThreadPoolExecutor(preproc_workers, "sgl-preproc")
        self.calls: list[tuple[str, list[str]]] = []  # (modality, req_ids) of every batch_encode

    async def batch_encode(self, requests: list[dict], modality: Any) -> list[tuple]:
        name = str(getattr(modality, "name", modality)).lower()
        self.calls.append((name, [r["req_id"] for r in requests]))
        flat = [leaf for r in requests for leaf in r["mm_items"]]
        loop = asyncio.get_running_loop()
        pixels, grids = await loop.run_in_executor(self.preproc_executor, self.preprocess, name, flat)
        units = tower_units(pixels, grids)
        with torch.inference_mode():  # on the event loop, as SGLang's get_*_feature call is
            outs = self.tower.forward(units)
            embedding = torch.cat(list(outs), dim=0).cpu()  # blocks the loop until the GPU is done
        results, row, grid_index = [], 0, 0
        for r in requests:
            n = len(r["mm_items"])
            tokens = llm_tokens(grids[grid_index: grid_index + n])
            part = embedding[row: row + tokens]
            results.append((part.nbytes, part.shape[0], part.shape[1], None, None))
            row, grid_index = row + tokens, grid_index + n
        return results

    async def encode(self, mm_items: Any, modality: Any, req_id: str, num_parts: int, part_idx: int,
                     hashes: Any = None) -> tuple:
        """server.py:2268-2284: the batch-of-1 case."""
        return (await self.batch_encode([{"req_id": req_id, "num_parts": num_parts, "part_idx": part_idx,
                                          "mm_items": mm_items, "hashes": hashes}], modality))[0]

    async def release_request(self, req_id: str) -> None:
        return None

    def close(self) -> None:
        self.preproc_executor.shutdown(wait=False)


class _Pending:
    """runtime.py:69-75 PendingRequest."""

    __slots__ = ("future", "request", "submit_time")

    def __init__(self, request: dict, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.future: asyncio.Future = loop.create_future()
        self.submit_time = time.time()


_BATCHABLE = {"image", "audio"}  # runtime.py:80 _BATCHABLE_MODALITIES (VIDEO excluded)


class SGLangEncoderPolicy:
    """SGLang 0.5.23 ``EncoderScheduler`` (runtime.py:144-392), TP=1 (no send sockets), without sglang."""

    def __init__(self, encoder: BenchEncoder, max_batch_size: int = SGLANG_MAX_BATCH_SIZE) -> None:
        self.encoder = encoder
        self.max_batch_size = max(1, int(max_batch_size))  # runtime.py:157; coalesce_same_turn is kimi-only
        self.pending_queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker_task: asyncio.Task | None = None

    def start(self) -> None:  # runtime.py:163-165
        if self._worker_task is None:
            self._worker_task = asyncio.get_running_loop().create_task(self._batch_worker())

    async def stop(self) -> None:  # runtime.py:172-176
        if self._worker_task is not None:
            self._worker_task.cancel()
            await asyncio.gather(self._worker_task, return_exceptions=True)
            self._worker_task = None

    async def submit(self, request: dict) -> tuple:  # runtime.py:187-191
        pending = _Pending(request, asyncio.get_running_loop())
        await self.pending_queue.put(pending)
        return await pending.future

    async def _collect_batch(self) -> list[_Pending]:  # runtime.py:204-222 (no window, no budget)
        batch = [await self.pending_queue.get()]
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self.pending_queue.get_nowait())
            except asyncio.QueueEmpty:
                break
        return batch

    async def _batch_worker(self) -> None:  # runtime.py:224-247: one batch at a time
        while True:
            batch: list[_Pending] = []
            try:
                batch = await self._collect_batch()
                groups: dict[str, list[_Pending]] = defaultdict(list)
                for p in batch:
                    groups[p.request.get("modality", "image")].append(p)
                for modality, group in groups.items():
                    await self._dispatch_group(group, modality)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # runtime.py:241-247
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)

    async def _dispatch_group(self, group: list[_Pending], modality: str) -> None:  # runtime.py:249-356
        group = [p for p in group if not p.future.done()]
        if not group:
            return
        if modality not in _BATCHABLE:  # runtime.py:262-265: video one request at a time
            for p in group:  # runtime.py:358-392 _dispatch_per_request
                req = p.request
                try:
                    result = await self.encoder.encode(req["mm_items"], modality, req["req_id"], req["num_parts"],
                                                       req["part_idx"], req.get("hashes"))
                    if not p.future.done():
                        p.future.set_result(result)
                except Exception as exc:
                    if not p.future.done():
                        p.future.set_exception(exc)
            return
        async with self.encoder.encode_dispatch_lock:  # runtime.py:296-313
            results = await self.encoder.batch_encode([p.request for p in group], modality)
        for p, result in zip(group, results, strict=True):  # runtime.py:354-356
            if not p.future.done():
                p.future.set_result(result)


# --- the coalescing path ------------------------------------------------------------------------
class HostCopyTower(TowerWrapper):
    """The tower plus epd.py's device-to-host copy: per-unit pinned buffers filled with ``non_blocking=True``
    on the executor's stream, so nothing blocks; the coalescer waits for the batch's CUDA event off the loop.

    One pinned buffer per unit, so each result pins only its own host memory.
    """

    def __init__(self, tower: Any) -> None:
        super().__init__(tower)

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        outs = list(self.inner.forward(units))
        if self.device.type != "cuda":
            return outs
        hosts = []
        for out in outs:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            hosts.append(host)
        return hosts


class CoalescingEncoderServer:
    """``CoalescedEncoderScheduler.submit`` (integration/epd.py) without sglang: preprocess at submit on a
    pool, one EncodeItem per grid entry (a video is one item of temporal slices), coalesce, join."""

    def __init__(self, tower: Any, preprocess: Preprocessor, config: CoalescerConfig, workers: int) -> None:
        self.coalescer = Coalescer(HostCopyTower(tower), config)
        self.preprocess = preprocess
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, "mm-epd-preproc")

    def start(self) -> None:
        """Nothing: ``astart`` is awaited instead (the Coalescer starts inside a coroutine)."""

    async def astart(self) -> None:
        await self.coalescer.start()

    async def stop(self) -> None:
        await self.coalescer.aclose()
        self.pool.shutdown(wait=False)

    async def submit(self, request: dict) -> tuple:
        loop = asyncio.get_running_loop()
        modality = request["modality"]
        pixels, grids = await loop.run_in_executor(self.pool, self._prepare, modality, request["mm_items"])
        items, offset = [], 0
        for t, h, w in grids:
            rows = pixels[offset: offset + t * h * w]
            offset += t * h * w
            if modality == "video":
                items.append(EncodeItem(rows.view(t, h * w, -1), h * w, "video", meta={"grid_hw": (h, w)}))
            else:
                items.append(EncodeItem(rows, h * w, meta={"grid_hw": (h, w)}))
        outs = await self.coalescer.encode(items)
        embedding = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return embedding.nbytes, embedding.shape[0], embedding.shape[1], None, None

    def _prepare(self, modality: str, items: Sequence[np.ndarray]) -> tuple[torch.Tensor, list]:
        pixels, grids = self.preprocess(modality, items)
        if self.coalescer.device.type == "cuda":
            pixels = pixels.pin_memory()  # so the executor's H2D copy is asynchronous
        return pixels, grids


# --- running a trace ----------------------------------------------------------------------------
@dataclass
class RunResult:
    latencies_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    makespan_s: float = 0.0
    batches: list[int] = field(default_factory=list)  # requests (or units) per batch
    extra: dict[str, Any] = field(default_factory=dict)


def make_server(mode: str, tower: Any, preprocess: Preprocessor, args: argparse.Namespace,
                budget: int, real_sglang: bool = False) -> tuple[Any, Any]:
    """(server with start/stop/submit, BenchEncoder or None)."""
    if mode == "coalescer":
        config = CoalescerConfig(name="epd-bench", budget_bytes=budget, bytes_per_patch=tower.bytes_per_patch,
                                 max_wait_ms=args.max_wait_ms, max_batch_items=args.max_batch_items,
                                 max_inflight_batches=2, forward_timeout_s=None)
        return CoalescingEncoderServer(tower, preprocess, config, args.preproc_workers), None
    encoder = BenchEncoder(tower, preprocess)
    if real_sglang:
        from sglang.srt.disaggregation.encoder.runtime import EncoderScheduler

        return EncoderScheduler(encoder, [], max_batch_size=SGLANG_MAX_BATCH_SIZE), encoder
    return SGLangEncoderPolicy(encoder), encoder


async def run_trace(server: Any, encoder: BenchEncoder | None, trace: list[tuple[float, tuple[str, list]]],
                    desc: str) -> RunResult:
    """Submit each request at its arrival time (open loop); latency = completion - scheduled arrival."""
    result = RunResult()
    server.start()
    if hasattr(server, "astart"):
        await server.astart()
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    if encoder is not None:
        encoder.calls.clear()

    async def one(index: int, arrival: float, modality: str, items: list) -> None:
        request = {"req_id": f"r{index}", "modality": modality, "mm_items": items, "num_parts": 1, "part_idx": 0}
        try:
            _, tokens, _, err, _ = await server.submit(request)
        except Exception:  # counted; the run goes on
            result.errors += 1
            return
        if err is not None:
            result.errors += 1
            return
        result.tokens += tokens
        result.latencies_ms.append((loop.time() - start - arrival) * 1000)

    tasks = []
    for index, (arrival, (modality, items)) in enumerate(progress(trace, len(trace), desc)):
        delay = start + arrival - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(index, arrival, modality, items)))
    await asyncio.gather(*tasks)
    result.makespan_s = loop.time() - start
    if encoder is not None:
        result.batches = [len(ids) for _, ids in encoder.calls]
    else:
        stats = server.coalescer.stats()
        result.extra = {"forwards": stats["forwards"], "mean_patches_per_forward": stats["mean_patches_per_forward"],
                        "max_forward_patches": stats["max_forward_patches"]}
    await server.stop()
    if encoder is not None:
        encoder.close()
    return result


def run_mode(mode: str, tower: Any, preprocess: Preprocessor, args: argparse.Namespace, budget: int,
             trace: list, desc: str) -> RunResult:
    async def go() -> RunResult:
        server, encoder = make_server(mode, tower, preprocess, args, budget)
        return await run_trace(server, encoder, trace, desc)

    if tower.device.type == "cuda":
        torch.cuda.synchronize()
    return asyncio.run(go())


def summarize(mode: str, run: RunResult, offered: int, **extra: Any) -> dict[str, Any]:
    done = len(run.latencies_ms)
    row: dict[str, Any] = {"mode": mode, **extra, "requests": offered, "done": done, "errors": run.errors,
                           "makespan_s": run.makespan_s,
                           "throughput_rps": done / run.makespan_s if run.makespan_s else 0.0,
                           "tokens_per_s": run.tokens / run.makespan_s if run.makespan_s else 0.0,
                           **latency_stats(run.latencies_ms, "latency")}
    if run.batches:
        row["batches"] = len(run.batches)
        row["mean_requests_per_batch"] = statistics.fmean(run.batches)
    row.update(run.extra)
    return row


# --- cross-check against SGLang's real EncoderScheduler ---------------------------------------
def crosscheck(tower: Any, preprocess: Preprocessor, workload: Workload, n: int = 21) -> dict[str, Any] | None:
    """Same requests, all queued in one loop turn, through the reproduction and SGLang's own class:
    the batches each forms (modality, request ids, in order) must be identical."""
    try:
        from sglang.srt.disaggregation.encoder.runtime import EncoderScheduler  # noqa: F401
    except Exception as exc:  # any import failure means: no cross-check here
        log(f"cross-check skipped: sglang not importable ({type(exc).__name__})")
        return None
    rng = random.Random(7)
    requests = [workload.draw(rng) for _ in range(n)]

    async def calls(real: bool) -> list[tuple[str, list[str]]]:
        encoder = BenchEncoder(tower, preprocess)
        if real:
            from sglang.srt.disaggregation.encoder.runtime import EncoderScheduler

            server = EncoderScheduler(encoder, [], max_batch_size=SGLANG_MAX_BATCH_SIZE)
        else:
            server = SGLangEncoderPolicy(encoder)
        server.start()
        await asyncio.sleep(0)  # the worker waits on the queue before anything arrives
        futures = [server.submit({"req_id": f"r{i}", "modality": m, "mm_items": items, "num_parts": 1,
                                  "part_idx": 0}) for i, (m, items) in enumerate(requests)]
        results = await asyncio.gather(*futures)
        await server.stop()
        encoder.close()
        assert all(r[3] is None for r in results), results
        return encoder.calls

    repro, real = asyncio.run(calls(False)), asyncio.run(calls(True))
    return {"requests": n, "match": repro == real, "reproduction": repro, "sglang": real}


# --- main ---------------------------------------------------------------------------------------
COLUMNS = [("load", "load", ".0%"), ("mode", "mode", "s"), ("rate_rps", "offered/s", ".1f"),
           ("done", "done", "d"), ("throughput_rps", "req/s", ".2f"), ("tokens_per_s", "tok/s", ".0f"),
           ("latency_p50_ms", "p50 ms", ".1f"), ("latency_p90_ms", "p90 ms", ".1f"),
           ("latency_p99_ms", "p99 ms", ".1f")]


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        rows = [r for r in report["loads"] if r["mode"] == mode]
        loads = [r["load"] * 100 for r in rows]
        ax1.plot(loads, [r["throughput_rps"] for r in rows], "o-", label=mode)
        ax2.plot(loads, [r["latency_p50_ms"] for r in rows], "o-", label=f"{mode} p50")
        ax2.plot(loads, [r["latency_p99_ms"] for r in rows], "x--", label=f"{mode} p99")
    ax1.set(xlabel="offered load, % of SGLang capacity", ylabel="completed requests/s",
            title="EPD encoder throughput")
    ax2.set(xlabel="offered load, % of SGLang capacity", ylabel="latency ms", yscale="log",
            title="EPD encoder latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(report["meta"]["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny tower, short trace (seconds)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON path (default {OUT}; plot next to it)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per load (default 8)")
    p.add_argument("--min-requests", type=int, default=None, help="per load: arrivals last until this many "
                   "are expected (default 15; 3 with --smoke)")
    p.add_argument("--burst", type=int, default=None, help="requests of the saturation burst (default 120)")
    p.add_argument("--budget-mib", type=int, default=8192)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--max-batch-items", type=int, default=128)
    p.add_argument("--preproc-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = resolve(args.device or ("cpu" if args.smoke else "cuda"))
    duration = args.duration or (1.0 if args.smoke else 8.0)
    burst = args.burst or (10 if args.smoke else 120)
    out = args.out or (Path("benchmarks/results/epd_bench_smoke.json") if args.smoke else OUT)
    logging.getLogger("mm_scheduler").setLevel(logging.ERROR)
    t0 = time.perf_counter()

    tower = build_bench_tower("qwen2_5_vl", device, tiny=args.smoke)
    tower.bytes_per_patch = bytes_per_patch(tower)
    budget = args.budget_mib << 20
    preprocess = Preprocessor(tower.dtype)
    workload = Workload.build(tiny=args.smoke, seed=args.seed)
    log(f"bytes/patch {tower.bytes_per_patch}, budget {budget >> 20} MiB = {budget // tower.bytes_per_patch} patches")

    warm = [(0.0, req) for req in workload.warm_set()]
    for mode in MODES:  # every shape once, each path: kernels, allocator, processor
        run_mode(mode, tower, preprocess, args, budget, warm, f"warm {mode}")

    rng = random.Random(args.seed + 1)
    burst_trace = [(0.0, workload.draw(rng)) for _ in range(burst)]
    saturation = {}
    for mode in MODES:
        saturation[mode] = summarize(mode, run_mode(mode, tower, preprocess, args, budget, burst_trace,
                                                    f"burst {mode}"), burst, load="burst")
    capacity = saturation["sglang"]["throughput_rps"]
    log(f"SGLang-policy capacity {capacity:.2f} req/s; coalescer {saturation['coalescer']['throughput_rps']:.2f}")

    rows = []
    for load in LOADS:
        rate = load * capacity
        wanted, seconds = args.min_requests or (3 if args.smoke else 15), duration
        while len(trace := poisson_trace(workload.draw, rate, seconds, seed=args.seed + 100 + int(load * 100))) \
                < wanted:  # the same seeded stream, longer: at least ``wanted`` arrivals at every load
            seconds *= 1.5
        for mode in MODES:
            run = run_mode(mode, tower, preprocess, args, budget, trace, f"{load:.0%} {mode}")
            rows.append(summarize(mode, run, len(trace), load=load, rate_rps=rate))

    def row(load: float, mode: str) -> dict[str, Any]:
        return next(r for r in rows if r["load"] == load and r["mode"] == mode)

    speedup = saturation["coalescer"]["throughput_rps"] / capacity if capacity else float("nan")
    over = row(1.5, "coalescer")["throughput_rps"] / max(row(1.5, "sglang")["throughput_rps"], 1e-9)
    p50_ratio = row(0.1, "coalescer")["latency_p50_ms"] / row(0.1, "sglang")["latency_p50_ms"]
    check = crosscheck(tower, preprocess, workload) if args.smoke else None
    report = {
        "meta": {"device": device_name(device), "tower": "qwen2_5_vl" + (" (tiny)" if args.smoke else " 7B ViT"),
                 "dtype": str(tower.dtype), "bytes_per_patch": tower.bytes_per_patch, "budget_bytes": budget,
                 "duration_s": duration, "burst": burst, "seed": args.seed, "torch": torch.__version__,
                 "sglang_max_batch_size": SGLANG_MAX_BATCH_SIZE, "preproc_workers": args.preproc_workers,
                 "max_wait_ms": args.max_wait_ms, "sglang_capacity_rps": capacity,
                 "wall_s": time.perf_counter() - t0},
        "saturation": {**saturation, "speedup": speedup},
        "loads": rows,
        "targets": {"saturation_speedup": speedup, "saturation_speedup_met": speedup >= 1.5,
                    "throughput_ratio_at_150pct": over, "p50_ratio_at_10pct": p50_ratio,
                    "p50_at_10pct_met": p50_ratio <= 1.0},
        "crosscheck": check,
    }
    write_json(out, report)
    plot(report, out.with_suffix(".png"))
    print(format_table([saturation["sglang"], saturation["coalescer"]], COLUMNS[1:2] + COLUMNS[3:]))
    print(format_table(rows, COLUMNS))
    print(markdown_table(rows, COLUMNS))
    print(f"saturation speedup {speedup:.2f}x (target 1.5x); 150% load throughput ratio {over:.2f}x; "
          f"p50 at 10% coalescer/sglang {p50_ratio:.2f} (target <= 1)"
          + ("" if check is None else f"; cross-check with SGLang's EncoderScheduler: match={check['match']}"))
    log(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    return report


if __name__ == "__main__":
    main()
