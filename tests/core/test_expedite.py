"""Expediting: units someone is blocked on (a prefill needs them now) jump the queue."""

from __future__ import annotations

import asyncio
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from mm_scheduler import Coalescer, CoalescerConfig
from mm_scheduler.planner import Planner, PlanUnit
from mm_scheduler.testing import FakeTower, expected_encoding

from .helpers import image, until


def make_planner(ragged: bool, budget_patches: int = 100, max_items: int = 8) -> Planner:
    return Planner(ragged=ragged, bytes_per_patch=1, budget_bytes=budget_patches, max_batch_items=max_items)


def test_expedited_bucket_goes_before_a_fuller_and_an_aged_bucket():
    p = make_planner(ragged=False)
    full = [PlanUnit(10, 0.0) for _ in range(8)]  # fills its bucket: would go first
    urgent = PlanUnit(30, 5.0)
    p.add(full)
    p.add([urgent])
    p.expedite([urgent])
    assert p.next_batch(now=100.0, max_wait=1.0) == [urgent]  # bucket 10 is also aged: still second
    assert p.next_batch(now=100.0, max_wait=1.0) == full


def test_expedited_units_move_to_the_front_of_their_bucket_in_their_own_order():
    p = make_planner(ragged=True, budget_patches=30)
    units = [PlanUnit(10, float(i)) for i in range(6)]
    p.add(units)
    p.expedite([units[5], units[3]])
    assert p.next_batch(now=0.0, max_wait=100.0) == [units[5], units[3], units[0]]
    assert p.next_batch(now=0.0, max_wait=100.0) == [units[1], units[2], units[4]]


def test_window_policy_dispatches_an_expedited_bucket_before_it_fills():
    p = make_planner(ragged=True)
    unit = PlanUnit(10, 0.0)
    p.add([unit])
    assert p.next_batch(now=0.0, max_wait=100.0, only_ready=True) is None
    p.expedite([unit])
    assert p.next_batch(now=0.0, max_wait=100.0, only_ready=True) == [unit]


def test_expediting_cancelled_or_already_taken_units_changes_nothing():
    p = make_planner(ragged=False)
    a, b, c = PlanUnit(10, 0.0), PlanUnit(20, 1.0), PlanUnit(20, 2.0)
    p.add([a, b, c])
    p.discard(b)
    taken = p.next_batch(now=0.0, max_wait=100.0)
    p.expedite([b, *taken])
    assert p.next_batch(now=0.0, max_wait=100.0) == [x for x in (a, c) if x not in taken]
    assert p.pending_units == 0


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.sampled_from([4, 8, 16]), min_size=1, max_size=30),
       picks=st.lists(st.integers(0, 29), max_size=10), ragged=st.booleans())
def test_expediting_never_loses_duplicates_or_breaks_the_budget(sizes, picks, ragged):
    p = make_planner(ragged=ragged, budget_patches=32, max_items=4)
    units = [PlanUnit(n, float(i)) for i, n in enumerate(sizes)]
    p.add(units)
    chosen = [units[i] for i in dict.fromkeys(picks) if i < len(units)]
    p.expedite(chosen)
    seen: list[PlanUnit] = []
    first = p.next_batch(now=0.0, max_wait=1e9)
    if chosen:  # the first batch serves the first expedited unit's bucket, expedited units first
        assert first[0] is chosen[0]
    batch = first
    while batch is not None:
        assert len(batch) <= 4 and (len(batch) == 1 or sum(u.num_patches for u in batch) <= 32)
        seen.extend(batch)
        batch = p.next_batch(now=0.0, max_wait=1e9)
    assert sorted(map(id, seen)) == sorted(map(id, units))


async def _tower_busy_with_three_older_requests(co: Coalescer, tower: FakeTower) -> list[asyncio.Task]:
    """One forward held at the gate, three older one-unit requests queued behind it (one unit per batch)."""
    tasks = [asyncio.create_task(co.encode([image(16)]))]
    await until(lambda: len(tower.log) == 1)
    tasks += [asyncio.create_task(co.encode([image(16, key=f"old{i}")])) for i in range(3)]
    await until(lambda: co.stats()["pending_units"] == 3)
    return tasks


def _gated_setup() -> tuple[threading.Event, FakeTower, CoalescerConfig]:
    gate = threading.Event()
    config = CoalescerConfig(max_wait_ms=10_000.0, max_batch_items=1, budget_bytes=1 << 30)
    return gate, FakeTower(gate=gate, ragged=True), config


async def test_coalescer_expedite_runs_a_blocked_request_before_older_queued_work():
    gate, tower, config = _gated_setup()
    async with Coalescer(tower, config) as co:
        earlier = await _tower_busy_with_three_older_requests(co, tower)
        needed = image(16, key="needed")
        blocked = asyncio.create_task(co.encode([needed]))
        await until(lambda: co.stats()["pending_units"] == 4)
        assert co.expedite(["needed", "absent"]) == 1
        gate.set()
        (out,) = await blocked
        await asyncio.gather(*earlier)
    assert [r.keys for r in tower.log][1] == ("needed",)
    assert out.equal(expected_encoding(needed))


async def test_a_key_expedited_before_its_submit_arrives_is_dispatched_first_once_queued():
    """Another thread's submit and its expedite can reach the loop in either order (the SGLang plugin
    submits at arrival and expedites at prefill of the same scheduler iteration)."""
    gate, tower, config = _gated_setup()
    async with Coalescer(tower, config) as co:
        earlier = await _tower_busy_with_three_older_requests(co, tower)
        assert co.expedite(["early"]) == 0  # not queued yet: remembered
        blocked = asyncio.create_task(co.encode([image(16, key="early")]))
        await until(lambda: co.stats()["expedited_units"] == 1)
        gate.set()
        await asyncio.gather(blocked, *earlier)
    assert [r.keys for r in tower.log][1] == ("early",)
