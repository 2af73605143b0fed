"""Small builders shared by the core tests."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import torch

from mm_scheduler import EncodeItem

_ids = itertools.count(1)


def image(num_patches: int = 16, key=None, **meta) -> EncodeItem:
    """An image whose pixels are unique, so its fake-tower output identifies it."""
    return EncodeItem(torch.full((3, 4), float(next(_ids))), num_patches, "image", key, meta)


def video(frames: int, num_patches: int = 16, key=None) -> EncodeItem:
    base = float(next(_ids)) * 1000
    pixels = torch.stack([torch.full((3, 4), base + f) for f in range(frames)])
    return EncodeItem(pixels, num_patches, "video", key)


async def until(predicate, timeout: float = 5.0) -> None:
    """Yield to the loop until ``predicate()`` holds (fails the test after ``timeout``)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def pending_tasks() -> set[asyncio.Task]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


def current_gpu() -> torch.device:
    """The current GPU with its index, as the coalescer resolves a tower's bare "cuda" for its executor."""
    return torch.device("cuda", torch.cuda.current_device())


def gpu_unit() -> EncodeItem:
    """A 4-patch unit of ones on the GPU (``SleepingTower`` doubles it)."""
    return EncodeItem(torch.ones(4, 8, device="cuda"), 4)


def calibrated_sleep(seconds: float) -> tuple[int, float]:
    """Cycles for a ``torch.cuda._sleep`` of about ``seconds``, and how long that sleep took just now (timing
    events). A warm-up first: the first launch loads the kernel, and an idle H200 clocks down to ~345 MHz."""
    torch.cuda._sleep(200_000_000)
    torch.cuda.synchronize()

    def timed(cycles: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000

    probe = 100_000_000
    cycles = int(probe * seconds / min(timed(probe) for _ in range(3)))
    return cycles, min(timed(cycles) for _ in range(3))


class SleepingTower:
    """Each forward sleeps ``cycles`` on the current (encoder) stream, then doubles the pixels."""

    device = torch.device("cuda")
    ragged = True
    bytes_per_patch = 4

    def __init__(self, cycles: int) -> None:
        self.cycles = cycles

    def forward(self, units):
        torch.cuda._sleep(self.cycles)
        return [u.pixel_values * 2 for u in units]


def cpu_share(wait) -> float:
    """The calling thread's CPU seconds over the wall seconds that ``wait()`` took: ~1 for a spinning wait."""
    wall, cpu = time.perf_counter(), time.thread_time()
    wait()
    return (time.thread_time() - cpu) / (time.perf_counter() - wall)


def require_spinning_default_wait(cycles: int) -> None:
    """Skip as inconclusive unless a default CUDA event's wait spins here (CUDA's default for one context on a
    machine of many cores): only then does a low CPU share prove that a wait slept."""
    torch.cuda._sleep(cycles)
    event = torch.cuda.Event()
    event.record()
    share = cpu_share(event.synchronize)
    if share < 0.5:
        pytest.skip(f"inconclusive: a default event's wait used only {share:.0%} of a core here")
