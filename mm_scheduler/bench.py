"""Open-loop benchmark: one forward per request (today's behaviour) vs the coalescer, same arrivals.

Requests arrive as a Poisson process at a fixed offered rate, independent of how fast they are
served (open loop: a slow system builds a queue, as a server does). Latency is measured from each
request's scheduled arrival to its result, so queueing delay is counted.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .coalescer import Coalescer
from .config import CoalescerConfig
from .executor import Executor
from .testing import FakeTower, NoopTower
from .types import EncodeItem, Tower
from .units import resolve_device

RequestSampler = Callable[[random.Random], list[EncodeItem]]


@dataclass
class RunResult:
    mode: str
    offered_rps: float
    requests: int
    units: int
    seconds: float
    throughput_rps: float
    throughput_units_per_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    forwards: int
    mean_patches_per_forward: float
    mean_units_per_forward: float
    failed: int
    first_error: str | None = None
    """The first failure's type and message (None when every request succeeded)."""


class CountingTower:
    """Wraps a tower to count forwards, units and patches; every other attribute is the tower's own
    (``validate``, ``device``, calibration probes, ...)."""

    def __init__(self, tower: Tower) -> None:
        self.inner = tower
        self._lock = threading.Lock()
        self.forwards = self.units = self.patches = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def forward(self, units: Sequence[EncodeItem]) -> Sequence[torch.Tensor]:
        with self._lock:
            self.forwards += 1
            self.units += len(units)
            self.patches += sum(u.num_patches for u in units)
        return self.inner.forward(units)


class PerRequestEncoder:
    """Today's behaviour: each request's items go to the tower in their own forward(s), one at a time.

    A uniform tower gets one forward per distinct patch count of the request (it cannot pad across
    sizes); video frames ride along as units of their patch count. Same executor, stream and event
    handling as the coalescer, so the only difference measured is the batching.
    """

    def __init__(self, tower: Tower, device: torch.device) -> None:
        self.tower = tower
        self._executor = Executor(tower, device)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="per-request-forward")

    async def encode(self, items: Sequence[EncodeItem]) -> list[torch.Tensor]:
        units: list[EncodeItem] = []
        for item in items:
            if item.modality == "video":
                units.extend(EncodeItem(f, item.num_patches, "video", None, item.meta) for f in item.pixel_values)
            else:
                units.append(item)
        groups: dict[int, list[EncodeItem]] = {}
        for unit in units:
            groups.setdefault(0 if self.tower.ragged else unit.num_patches, []).append(unit)
        loop = asyncio.get_running_loop()
        outputs = []
        for group in groups.values():
            outcome = await loop.run_in_executor(self._thread, self._executor.run, group)
            if outcome.done is not None:
                await loop.run_in_executor(None, outcome.done.synchronize)
            for out in outcome.outputs:
                if isinstance(out, BaseException):
                    raise out
            outputs.extend(outcome.outputs)
        return outputs

    def close(self) -> None:
        self._thread.shutdown(wait=True)


async def open_loop(encode: Callable, requests: list[list[EncodeItem]], rate: float,
                    rng: random.Random) -> tuple[list[float], float, int, str | None]:
    """Submit ``requests`` at Poisson arrivals of ``rate``/s.

    Returns latencies (s), makespan, the number of failed requests and the first failure (type: message).
    """
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failed = 0
    first_error: str | None = None

    async def one(items: list[EncodeItem], arrival: float) -> None:
        nonlocal failed, first_error
        try:
            await encode(items)
        except Exception as exc:
            failed += 1
            if first_error is None:
                first_error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            return
        latencies.append(loop.time() - arrival)

    start = loop.time()
    arrival = start
    tasks = []
    for items in requests:
        arrival += rng.expovariate(rate)
        delay = arrival - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(items, arrival)))
    await asyncio.gather(*tasks)
    return latencies, loop.time() - start, failed, first_error


def summarize(mode: str, rate: float, requests: list[list[EncodeItem]], latencies: list[float], seconds: float,
              failed: int, tower: CountingTower, first_error: str | None = None) -> RunResult:
    units = sum(len(i.pixel_values) if i.modality == "video" else 1 for r in requests for i in r)
    ordered = sorted(latencies) or [float("nan")]
    p99_index = min(len(ordered) - 1, int(0.99 * len(ordered)))
    return RunResult(
        mode=mode, offered_rps=rate, requests=len(requests), units=units, seconds=round(seconds, 3),
        throughput_rps=len(latencies) / seconds, throughput_units_per_s=units / seconds,
        p50_ms=1000 * ordered[len(ordered) // 2], p99_ms=1000 * ordered[p99_index],
        mean_ms=1000 * statistics.fmean(ordered), forwards=tower.forwards,
        mean_patches_per_forward=tower.patches / max(tower.forwards, 1),
        mean_units_per_forward=tower.units / max(tower.forwards, 1), failed=failed, first_error=first_error)


MODES = ("per-request", "coalescer")


async def compare(tower: Tower, sample: RequestSampler, rates: Sequence[float], seconds: float,
                  config: CoalescerConfig, seed: int = 0,
                  progress: Callable[[str], None] | None = None) -> list[RunResult]:
    """For each rate, run the same arrival sequence through per-request forwards and the coalescer.

    ``progress`` (e.g. ``print``) gets one line when each stage starts and one when it ends.
    """
    device = resolve_device(config, tower)
    results = []
    stages = len(rates) * len(MODES)
    for rate in rates:
        rng = random.Random(seed)
        requests = [sample(rng) for _ in range(max(1, int(rate * seconds)))]
        for mode in MODES:
            if progress is not None:
                progress(f"[{len(results) + 1}/{stages}] {mode} at {rate:g} req/s: {len(requests)} requests "
                         f"over ~{len(requests) / rate:.1f} s")
            counting = CountingTower(tower)
            arrivals = random.Random(seed + 1)
            if mode == "per-request":
                encoder = PerRequestEncoder(counting, device)
                try:
                    latencies, makespan, failed, error = await open_loop(encoder.encode, requests, rate, arrivals)
                finally:
                    encoder.close()
            else:
                async with Coalescer(counting, config.replace(name=f"bench-{rate}")) as co:
                    latencies, makespan, failed, error = await open_loop(co.encode, requests, rate, arrivals)
            result = summarize(mode, rate, requests, latencies, makespan, failed, counting, error)
            results.append(result)
            if progress is not None:
                progress(f"      done in {makespan:.1f} s: {result.throughput_rps:.1f} req/s, "
                         f"p50 {result.p50_ms:.1f} ms, {failed} failed")
    return results


async def coalescer_overhead(clients: int = 256, rounds: int = 80, units_per_request: int = 8,
                             repeats: int = 3) -> dict:
    """The coalescer's own CPU cost: units/s through a no-op tower, best of ``repeats``.

    ``clients`` concurrent callers each send ``rounds`` requests back to back (closed loop), so the
    queue stays deep, as under load, while live objects stay bounded, as in a server.
    """
    config = CoalescerConfig(max_batch_items=256, budget_bytes=1 << 40, max_queue_patches=1 << 40,
                             name="bench-overhead")
    requests = [[EncodeItem(torch.zeros(1), 16) for _ in range(units_per_request)] for _ in range(clients)]
    best = 0.0
    for _ in range(repeats):
        async with Coalescer(NoopTower(), config) as co:
            async def client(items: list[EncodeItem]) -> None:
                for _ in range(rounds):
                    await co.encode(items)

            start = time.perf_counter()
            await asyncio.gather(*(client(r) for r in requests))
            elapsed = time.perf_counter() - start
        best = max(best, clients * rounds * units_per_request / elapsed)
    return {"units_per_s": best, "us_per_unit": 1e6 / best, "clients": clients,
            "units_per_request": units_per_request}


# --- the default workload: a fake tower shaped like SigLIP-so400m on an H100 --------------------
FAKE_FIXED_S = 0.0068
"""Launch + fixed cost of one forward: ~9 ms for one 729-patch image, ~2.2 ms/image batched (seen on H100)."""
FAKE_PER_PATCH_S = 3.0e-6


def fake_siglip_tower() -> FakeTower:
    return FakeTower(ragged=False, bytes_per_patch=26_500, fixed_s=FAKE_FIXED_S, per_patch_s=FAKE_PER_PATCH_S)


def fake_request(rng: random.Random) -> list[EncodeItem]:
    """1-4 images of 729 patches (384 px SigLIP); one request in ten also carries a 4-frame video."""
    items = [EncodeItem(torch.full((3, 8, 8), rng.random()), 729) for _ in range(rng.choice((1, 1, 2, 3, 4)))]
    if rng.random() < 0.1:
        items.append(EncodeItem(torch.rand(4, 3, 8, 8), 729, "video"))
    return items
