"""The deterministic (tensor-parallel) front end: no clock, no thread, batches cut by the planner."""

from __future__ import annotations

import pytest
import torch

from mm_scheduler import CoalescerConfig, EncodeError, EncodeItem, InvalidItemError
from mm_scheduler.lockstep import LockstepEncoder
from mm_scheduler.testing import FakeTower, expected_encoding

from .helpers import image, video


def encoder(tower: FakeTower, **overrides) -> LockstepEncoder:
    return LockstepEncoder(tower, CoalescerConfig(**{"max_batch_items": 4, "budget_bytes": 1024 * 200, **overrides}))


def test_nothing_runs_until_step_and_then_everything_queued_runs():
    tower = FakeTower()
    enc = encoder(tower)
    items = [image(16), image(64), video(3, 16)]
    ticket = enc.submit(items)
    assert tower.log == [] and not ticket.done()
    assert enc.step() == len(tower.log) > 0
    assert ticket.done() and enc.pending_units == 0
    for item, out in zip(items, enc.result(ticket), strict=True):
        assert torch.equal(out, expected_encoding(item))


def test_batches_are_a_pure_function_of_the_submit_sequence():
    logs = []
    for _ in range(2):
        tower = FakeTower()
        enc = encoder(tower)
        for n in (16, 64, 16, 16, 144, 64, 16, 16):
            enc.submit([EncodeItem(torch.ones(2) * n, n)])
        enc.step()
        logs.append([r.patch_counts for r in tower.log])
    assert logs[0] == logs[1]
    assert logs[0][0] == (16, 16, 16, 16)  # oldest unit's bucket first, capped at max_batch_items


def test_result_runs_a_step_when_the_ticket_is_not_done():
    enc = encoder(FakeTower())
    item = image(16)
    ticket = enc.submit([item])
    assert torch.equal(enc.result(ticket)[0], expected_encoding(item))


def test_equal_keys_encode_once_and_cancel_keeps_work_for_other_holder():
    tower = FakeTower()
    enc = encoder(tower)
    shared = image(16, key="h")
    first, second = enc.submit([shared]), enc.submit([shared])
    enc.cancel(first)
    assert enc.pending_units == 1
    assert torch.equal(enc.result(second)[0], expected_encoding(shared))
    assert sum(r.keys.count("h") for r in tower.log) == 1


def test_cancelled_ticket_units_never_reach_the_tower():
    tower = FakeTower()
    enc = encoder(tower)
    enc.cancel(enc.submit([image(16, key="gone")]))
    assert enc.step() == 0 and tower.log == []


def test_invalid_item_is_rejected_at_submit_and_nothing_is_queued():
    enc = encoder(FakeTower(), budget_bytes=1024 * 100)
    with pytest.raises(InvalidItemError, match="item 1: can never be encoded"):
        enc.submit([image(16), image(101)])
    assert enc.pending_units == 0


def test_failed_forward_fails_that_batch_and_later_batches_still_run():
    tower = FakeTower(fail_keys={"bad"})
    enc = encoder(tower)
    bad = enc.submit([image(16, key="bad")])
    enc.step()
    with pytest.raises(EncodeError, match="lockstep batch"):
        enc.result(bad)
    good_item = image(16)
    assert torch.equal(enc.result(enc.submit([good_item]))[0], expected_encoding(good_item))
