"""The planner alone: pure, synchronous, no clock. Properties are checked over random queues."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_scheduler.planner import Planner, PlanUnit


def make_planner(ragged: bool = False, budget_patches: int = 100, max_items: int = 8, bpp: int = 10) -> Planner:
    return Planner(ragged=ragged, bytes_per_patch=bpp, budget_bytes=budget_patches * bpp, max_batch_items=max_items)


def add_units(planner: Planner, sizes: list[int], start: float = 0.0) -> list[PlanUnit]:
    units = [PlanUnit(n, start + i) for i, n in enumerate(sizes)]
    planner.add(units)
    return units


def test_uniform_tower_batches_hold_a_single_patch_count():
    p = make_planner(ragged=False)
    add_units(p, [10, 20, 10, 20, 10])
    while p.pending_units:
        batch = p.next_batch(now=0.0, max_wait=100.0)
        assert len({u.num_patches for u in batch}) == 1


def test_ragged_tower_mixes_patch_counts_in_one_batch():
    p = make_planner(ragged=True)
    add_units(p, [10, 20, 30])
    assert [u.num_patches for u in p.next_batch(now=0.0, max_wait=100.0)] == [10, 20, 30]


def test_batch_stops_before_exceeding_patch_budget():
    p = make_planner(ragged=True, budget_patches=50)
    add_units(p, [20, 20, 20])
    assert [u.num_patches for u in p.next_batch(0.0, 100.0)] == [20, 20]
    assert [u.num_patches for u in p.next_batch(0.0, 100.0)] == [20]


def test_batch_stops_at_max_batch_items():
    p = make_planner(ragged=True, budget_patches=10_000, max_items=3)
    add_units(p, [1] * 7)
    assert [len(p.next_batch(0.0, 100.0)) for _ in range(3)] == [3, 3, 1]


def test_units_leave_a_bucket_in_arrival_order():
    p = make_planner(ragged=True, budget_patches=10_000)
    units = add_units(p, [5, 3, 9, 1])
    assert p.next_batch(0.0, 100.0) == units


def test_fullest_bucket_goes_first_when_none_has_aged():
    p = make_planner(budget_patches=100)
    add_units(p, [10], start=0.0)              # older, but a thin bucket
    add_units(p, [50, 50], start=1.0)          # fills its budget
    assert [u.num_patches for u in p.next_batch(now=1.5, max_wait=10.0)] == [50, 50]


def test_aged_bucket_goes_before_fuller_one():
    p = make_planner(budget_patches=100)
    add_units(p, [10], start=0.0)
    add_units(p, [50, 50], start=5.0)
    assert [u.num_patches for u in p.next_batch(now=10.0, max_wait=10.0)] == [10]


def test_oldest_aged_bucket_wins_among_aged_buckets():
    p = make_planner(budget_patches=100)
    add_units(p, [30], start=2.0)
    add_units(p, [10], start=1.0)
    assert [u.num_patches for u in p.next_batch(now=50.0, max_wait=10.0)] == [10]


def test_window_policy_holds_partial_bucket_until_it_ages():
    p = make_planner(budget_patches=100)
    add_units(p, [10], start=0.0)
    assert p.next_batch(now=1.0, max_wait=2.0, only_ready=True) is None
    assert p.next_deadline(max_wait=2.0) == 2.0
    assert len(p.next_batch(now=2.0, max_wait=2.0, only_ready=True)) == 1


def test_window_policy_releases_full_bucket_at_once():
    p = make_planner(budget_patches=100, max_items=2)
    add_units(p, [10, 10], start=0.0)
    assert len(p.next_batch(now=0.0, max_wait=2.0, only_ready=True)) == 2


def test_discarded_unit_is_never_planned_and_counts_are_updated():
    p = make_planner(ragged=True)
    units = add_units(p, [10, 20, 30])
    p.discard(units[1])
    p.discard(units[1])  # idempotent
    assert p.pending_units == 2 and p.pending_patches == 40
    assert [u.num_patches for u in p.next_batch(0.0, 100.0)] == [10, 30]
    assert p.pending_units == 0 and p.next_batch(0.0, 100.0) is None


def test_discarding_every_unit_of_a_bucket_leaves_nothing_to_plan():
    p = make_planner()
    units = add_units(p, [10, 10])
    for u in units:
        p.discard(u)
    assert p.next_batch(100.0, 0.0) is None and p.next_deadline(1.0) is None and list(p) == []


def test_never_fits_names_the_sizes():
    p = make_planner(budget_patches=100, bpp=10)
    assert p.never_fits(100) is None
    reason = p.never_fits(101)
    assert "101 patches" in reason and "1010 bytes" in reason and "1000 bytes" in reason


def test_oom_shrinks_only_that_bucket_and_never_below_one_unit():
    p = make_planner(budget_patches=100, max_items=64)
    assert p.shrink_budget(10, failed_patches=80) == 40
    assert p.bucket_budget_patches(10) == 40 and p.bucket_budget_patches(20) == 100
    add_units(p, [10] * 8)
    assert len(p.next_batch(0.0, 100.0)) == 4
    p.shrink_budget(10, failed_patches=1)
    assert len(p.next_batch(0.0, 100.0)) == 1  # the head always leaves, even above a shrunk budget


def test_shrink_never_raises_a_budget():
    p = make_planner(budget_patches=100)
    p.shrink_budget(0, failed_patches=40)
    assert p.shrink_budget(0, failed_patches=1000) == 20


def test_drain_is_a_pure_function_of_the_arrival_sequence():
    p = make_planner(budget_patches=30, max_items=2)
    add_units(p, [10, 20, 10, 30, 20, 10, 10, 30])
    plan = [[(u.num_patches, u.arrival) for u in b] for b in p.drain()]
    # Worked out by hand: always the bucket whose oldest unit arrived first, cut at 30 patches or 2 units.
    assert plan == [[(10, 0.0), (10, 2.0)], [(20, 1.0)], [(30, 3.0)], [(20, 4.0)], [(10, 5.0), (10, 6.0)],
                    [(30, 7.0)]]


def test_invalid_limits_are_rejected():
    with pytest.raises(ValueError):
        Planner(ragged=True, bytes_per_patch=0, budget_bytes=10, max_batch_items=1)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([1, 4, 16, 64, 256]), min_size=0, max_size=80),
    ragged=st.booleans(),
    budget_patches=st.integers(min_value=256, max_value=2000),
    max_items=st.integers(min_value=1, max_value=16),
    discard_mask=st.lists(st.booleans(), min_size=80, max_size=80),
    max_wait=st.floats(min_value=0.0, max_value=100.0),
)
def test_every_live_unit_is_planned_once_within_budget(sizes, ragged, budget_patches, max_items, discard_mask,
                                                       max_wait):
    p = make_planner(ragged=ragged, budget_patches=budget_patches, max_items=max_items)
    units = add_units(p, sizes)
    live = []
    for u, drop in zip(units, discard_mask, strict=False):
        if drop:
            p.discard(u)
        else:
            live.append(u)
    planned = []
    now = 0.0
    while (batch := p.next_batch(now, max_wait)) is not None:
        assert 1 <= len(batch) <= max_items
        assert sum(u.num_patches for u in batch) <= budget_patches
        if not ragged:
            assert len({u.num_patches for u in batch}) == 1
        arrivals = [u.arrival for u in batch]
        assert arrivals == sorted(arrivals)
        planned.extend(batch)
        now += 7.0
    assert sorted(map(id, planned)) == sorted(map(id, live))
    assert p.pending_units == 0 and p.pending_patches == 0
