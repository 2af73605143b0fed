"""Small builders shared by the core tests."""

from __future__ import annotations

import asyncio
import itertools

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
