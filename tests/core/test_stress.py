"""Hammer the coalescer: thousands of concurrent requests, random sizes, videos, cancellations, poison.

Every request must end in exactly one of: the right outputs in the right order, EncodeError (it held a
poisoned unit), or CancelledError (the test cancelled it). Nothing lost, misrouted, misordered or
left pending; no forward over budget; a uniform tower never sees mixed patch counts.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

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


def own_keys(items: list[EncodeItem]) -> set:
    """Keys only this request submits (dedup candidates ``shared-*`` may be wanted by others too)."""
    keys: set = set()
    for item in items:
        if item.modality == "video":
            keys.update((item.key, f) for f in range(item.pixel_values.shape[0]))
        elif not item.key.startswith("shared-"):
            keys.add(item.key)
    return keys


def reached_tower_after(log: list, start: int, keys: set) -> list[int]:
    """Indices of forwards from ``start`` on that ran one of ``keys``, except the batch already handed
    to the forward thread at ``start`` (one at most: log[start]) and its bisection retries (subsets of it)."""
    allowed = set(log[start].keys) if start < len(log) else set()
    index, bad = start + 1, []
    while index < len(log) and set(log[index].keys) <= allowed:  # bisection of the batch at ``start``
        index += 1
    bad.extend(i for i in range(index, len(log)) if keys & set(log[i].keys))
    return bad


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
    requests = [random_request(rng, i, shared) for i in range(2000)]
    outcomes: dict[int, str] = {}
    # For each cancelled request: its own keys and how many forwards the tower had started when it was
    # cancelled (None: cancelled before it submitted anything).
    cancelled_at: dict[int, tuple[set, int | None]] = {}

    async with Coalescer(tower, cfg) as co:
        async def client(request_id: int) -> None:
            items = requests[request_id][0]
            submitted = False
            try:
                await asyncio.sleep(rng.random() * 0.2)
                submitted = True
                outs = await co.encode(items)
            except EncodeError:
                outcomes[request_id] = "failed"
                return
            except asyncio.CancelledError:
                outcomes[request_id] = "cancelled"
                cancelled_at[request_id] = (own_keys(items), len(tower.log) if submitted else None)
                raise
            outcomes[request_id] = "ok" if all(
                torch.equal(out, expected_encoding(item)) for item, out in zip(items, outs, strict=True)
            ) and len(outs) == len(items) else "wrong result"

        tasks = [asyncio.create_task(client(i)) for i in range(2000)]
        doomed = set(rng.sample(range(2000), 100))
        for i in doomed:
            asyncio.get_running_loop().call_later(rng.random() * 0.25, tasks[i].cancel)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=120)
        stats = co.stats()

    # Every request ended in exactly the outcome its content and the test's cancellations call for.
    poisoned = {i for i, (_, p) in enumerate(requests) if p}
    for i, result in enumerate(results):
        if i not in outcomes:  # cancelled before its task first ran: its body never started
            outcomes[i] = "cancelled"
            cancelled_at[i] = (own_keys(requests[i][0]), None)
        if outcomes[i] == "cancelled":
            assert i in doomed and isinstance(result, asyncio.CancelledError), i
        else:
            assert result is None, (i, result)
            assert outcomes[i] == ("failed" if i in poisoned else "ok"), (i, outcomes[i])
    counts = Counter(outcomes.values())
    assert counts["ok"] > 1500 and counts["failed"] > 0 and counts["cancelled"] > 0, counts
    assert stats["cancelled_requests"] == sum(1 for _, at in cancelled_at.values() if at is not None)
    # Cancelled work is withdrawn: a cancelled request's units still queued never reach the tower.
    for i, (keys, at) in cancelled_at.items():
        late = reached_tower_after(tower.log, at, keys) if at is not None else [
            n for n, r in enumerate(tower.log) if keys & set(r.keys)]
        assert late == [], f"request {i} was cancelled after {at} forwards, yet its units ran in forwards {late}"
    assert stats["dedup_hits"] > 0 and stats["failed_units"] > 0
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
