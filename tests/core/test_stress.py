"""Hammer the coalescer: thousands of concurrent requests, random sizes, videos, cancellations, poison.

Every request must end in exactly one of: the right outputs in the right order, EncodeError (it held a
poisoned unit), or CancelledError (the test cancelled it). Nothing lost, misrouted, misordered or
left pending; no forward over budget; a uniform tower never sees mixed patch counts.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from mm_scheduler import Coalescer, CoalescerConfig, EncodeError, EncodeItem
from mm_scheduler.testing import FakeTower, expected_encoding

from .helpers import pending_tasks

PATCH_SIZES = (16, 64, 144, 256, 576)
BYTES_PER_PATCH = 100


def random_request(rng: random.Random, request_id: int, shared: list[EncodeItem]) -> tuple[list[EncodeItem], bool]:
    items, poisoned = [], False
    for j in range(rng.randint(1, 16)):
        roll = rng.random()
        if roll < 0.15:
            items.append(rng.choice(shared))  # same key, same pixels: dedup candidates
        elif roll < 0.30:
            frames = rng.randint(1, 6)
            pixels = torch.arange(frames * 6, dtype=torch.float32).reshape(frames, 2, 3) + request_id * 100 + j
            items.append(EncodeItem(pixels, rng.choice(PATCH_SIZES[:3]), "video", key=f"v{request_id}-{j}"))
        else:
            key = f"r{request_id}-{j}"
            if rng.random() < 0.004:
                key, poisoned = f"poison-{request_id}-{j}", True
            items.append(EncodeItem(torch.full((2, 3), request_id * 100.0 + j), rng.choice(PATCH_SIZES), key=key))
    return items, poisoned


@pytest.mark.stress
@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
@pytest.mark.parametrize("dispatch", ["eager", "window"])
async def test_thousands_of_concurrent_requests_lose_and_misroute_nothing(ragged, dispatch):
    rng = random.Random(1234 + ragged)
    shared = [EncodeItem(torch.full((2, 3), -float(i)), rng.choice(PATCH_SIZES), key=f"shared-{i}") for i in range(20)]
    poison = {f"poison-{i}-{j}" for i in range(3000) for j in range(16)}
    tower = FakeTower(ragged=ragged, bytes_per_patch=BYTES_PER_PATCH, fixed_s=0.0002, per_patch_s=1e-8,
                      fail_keys=poison)
    budget_bytes = 4096 * BYTES_PER_PATCH
    cfg = CoalescerConfig(max_wait_ms=1.0, max_batch_items=48, budget_bytes=budget_bytes,
                          max_queue_patches=10_000_000, dispatch=dispatch)
    outcomes: dict[int, str] = {}

    async with Coalescer(tower, cfg) as co:
        async def client(request_id: int) -> None:
            items, poisoned = random_request(rng, request_id, shared)
            await asyncio.sleep(rng.random() * 0.2)
            try:
                outs = await co.encode(items)
            except EncodeError:
                assert poisoned, f"request {request_id} failed without a poisoned unit"
                outcomes[request_id] = "failed"
                return
            except asyncio.CancelledError:
                outcomes[request_id] = "cancelled"
                raise
            assert not poisoned, f"request {request_id} held a poisoned unit but succeeded"
            assert len(outs) == len(items)
            for item, out in zip(items, outs, strict=True):
                assert torch.equal(out, expected_encoding(item)), f"misrouted result in request {request_id}"
            outcomes[request_id] = "ok"

        tasks = [asyncio.create_task(client(i)) for i in range(2000)]
        for task in rng.sample(tasks, 100):
            asyncio.get_running_loop().call_later(rng.random() * 0.25, task.cancel)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=120)
        stats = co.stats()

    unexpected = [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)]
    assert unexpected == []
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert len(outcomes) + sum(1 for i in range(2000) if i not in outcomes) == 2000
    assert sum(v == "ok" for v in outcomes.values()) > 1500
    assert cancelled > 0 and stats["dedup_hits"] > 0 and stats["failed_units"] > 0
    assert stats["pending_units"] == 0 and stats["inflight_batches"] == 0
    assert co._jobs_by_key == {}
    assert pending_tasks() == set()
    for record in tower.log:
        assert record.patches * BYTES_PER_PATCH <= budget_bytes and len(record.patch_counts) <= 48
        if not ragged:
            assert len(set(record.patch_counts)) == 1
    assert stats["mean_patches_per_forward"] > 2 * min(PATCH_SIZES)  # it did coalesce
    assert tower.max_concurrent_forwards == 1  # one forward thread: the tower is never re-entered


@pytest.mark.stress
async def test_stress_with_oom_backoff_keeps_every_result_correct():
    rng = random.Random(7)
    tower = FakeTower(ragged=True, bytes_per_patch=BYTES_PER_PATCH, capacity_patches=1500, fixed_s=0.0002)
    cfg = CoalescerConfig(max_wait_ms=1.0, max_batch_items=64, budget_bytes=4096 * BYTES_PER_PATCH,
                          max_queue_patches=10_000_000)
    async with Coalescer(tower, cfg) as co:
        async def client(request_id: int) -> None:
            items = [EncodeItem(torch.full((2,), request_id * 100.0 + j), rng.choice(PATCH_SIZES))
                     for j in range(rng.randint(1, 8))]
            await asyncio.sleep(rng.random() * 0.1)
            for item, out in zip(items, await co.encode(items), strict=True):
                assert torch.equal(out, expected_encoding(item))

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(500))), timeout=60)
        assert co.stats()["oom_backoffs"] >= 1 and co.stats()["failed_units"] == 0
    assert max(r.patches for r in tower.log[-20:]) <= 1500
