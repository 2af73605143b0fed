"""Behaviours of the asyncio coalescer, each proved with a fake tower (see mm_scheduler.testing)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from mm_scheduler import (
    Coalescer,
    CoalescerClosedError,
    CoalescerConfig,
    Encoded,
    EncodeError,
    EncodeItem,
    InvalidItemError,
    QueueFullError,
)
from mm_scheduler.executor import BatchOutcome, deliverable_at_launch, join
from mm_scheduler.testing import FakeTower, expected_encoding

from .helpers import image, pending_tasks, until, video

pytestmark = pytest.mark.timeout(60)  # tests wait on gates and threads: a hang fails fast


def config(**overrides) -> CoalescerConfig:
    base = dict(max_wait_ms=2.0, max_batch_items=64, budget_bytes=1024 * 4096, max_queue_patches=1_000_000)
    return CoalescerConfig(**{**base, **overrides})


def assert_outputs(items, outputs) -> None:
    assert len(outputs) == len(items)
    for item, out in zip(items, outputs, strict=True):
        assert torch.equal(out, expected_encoding(item))


async def hold_tower_busy(co: Coalescer, gate: threading.Event) -> asyncio.Task:
    """Start one request whose forward blocks on ``gate``; returns its task once the tower holds it."""
    task = asyncio.create_task(co.encode([image(16)]))
    await until(lambda: len(co.tower.log) == 1)
    return task


# 1. coalescing -------------------------------------------------------------------------------
async def test_units_of_concurrent_requests_share_one_forward():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        requests = [[image(16), image(16)] for _ in range(10)]
        tasks = [asyncio.create_task(co.encode(r)) for r in requests]
        await until(lambda: co.stats()["pending_units"] == 20)
        gate.set()
        results = await asyncio.gather(*tasks)
        await first
    assert [r.patch_counts for r in tower.log] == [(16,), (16,) * 20]
    for items, outs in zip(requests, results, strict=True):
        assert_outputs(items, outs)


# 2. grouping ---------------------------------------------------------------------------------
async def test_uniform_tower_forwards_hold_one_patch_count():
    gate = threading.Event()
    tower = FakeTower(ragged=False, gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        items = [image(n) for n in (16, 64, 16, 256, 64, 16)]
        task = asyncio.create_task(co.encode(items))
        await until(lambda: co.stats()["pending_units"] == 6)
        gate.set()
        assert_outputs(items, await task)
        await first
    assert sorted(r.patch_counts for r in tower.log[1:]) == [(16, 16, 16), (64, 64), (256,)]


async def test_ragged_tower_mixes_patch_counts_in_one_forward():
    gate = threading.Event()
    tower = FakeTower(ragged=True, gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        items = [image(n) for n in (16, 64, 256)]
        task = asyncio.create_task(co.encode(items))
        await until(lambda: co.stats()["pending_units"] == 3)
        gate.set()
        assert_outputs(items, await task)
        await first
    assert tower.log[1].patch_counts == (16, 64, 256)


# 3. budget -----------------------------------------------------------------------------------
async def test_forwards_respect_patch_budget_and_item_cap():
    gate = threading.Event()
    tower = FakeTower(ragged=True, bytes_per_patch=100, gate=gate)
    async with Coalescer(tower, config(budget_bytes=100 * 100, max_batch_items=3)) as co:
        first = await hold_tower_busy(co, gate)
        items = [image(n) for n in (40, 40, 40, 10, 10, 10, 10, 90)]
        task = asyncio.create_task(co.encode(items))
        await until(lambda: co.stats()["pending_units"] == 8)
        gate.set()
        assert_outputs(items, await task)
        await first
    assert [r.patch_counts for r in tower.log[1:]] == [(40, 40), (40, 10, 10), (10, 10), (90,)]
    assert all(r.patches * 100 <= 100 * 100 and len(r.patch_counts) <= 3 for r in tower.log)


async def test_unit_that_can_never_fit_is_rejected_at_submit_with_its_sizes():
    tower = FakeTower(bytes_per_patch=1000)
    async with Coalescer(tower, config(budget_bytes=50_000)) as co:
        with pytest.raises(InvalidItemError, match=r"item 1: .*51 patches x 1000 bytes/patch = 51000 bytes.*50000"):
            await co.encode([image(50), image(51)])
        assert co.stats()["pending_units"] == 0 and tower.log == []
        fits = image(50)
        assert_outputs([fits], await co.encode([fits]))


# 4. dispatch policy --------------------------------------------------------------------------
HOUR_MS = 3_600_000.0  # a window no test waits out: a unit held for it would fail the test's deadline


async def test_lone_request_is_dispatched_at_once_not_after_the_window():
    tower = FakeTower()
    async with Coalescer(tower, config(max_wait_ms=HOUR_MS)) as co:
        item = image()
        async with asyncio.timeout(30):  # a coalescer holding the unit for the window never finishes
            assert_outputs([item], await co.encode([item]))
    assert [r.patch_counts for r in tower.log] == [(16,)]


async def settle() -> None:
    """Let every runnable task run to its next real wait (no I/O is involved, so a few passes suffice)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_window_policy_holds_lone_units_for_company():
    tower = FakeTower()
    async with Coalescer(tower, config(dispatch="window", max_wait_ms=HOUR_MS, max_batch_items=3)) as co:
        first = asyncio.create_task(co.encode([image(16)]))
        await settle()
        second = asyncio.create_task(co.encode([image(16)]))
        await settle()
        assert tower.log == [] and co.stats()["pending_units"] == 2  # neither is full nor aged: held
        third = asyncio.create_task(co.encode([image(16)]))  # fills the bucket: all three leave together
        async with asyncio.timeout(30):
            await asyncio.gather(first, second, third)
    assert [r.patch_counts for r in tower.log] == [(16, 16, 16)]


async def test_window_policy_releases_a_lone_unit_once_it_has_waited_max_wait():
    from prometheus_client import REGISTRY

    name = "window-aging-test"
    tower = FakeTower()
    async with Coalescer(tower, config(dispatch="window", max_wait_ms=30, name=name)) as co:
        async with asyncio.timeout(30):  # never full: only aging can release it
            await co.encode([image(16)])
    # The coalescer's own queue-wait histogram (its loop clock, submit to dispatch) saw the full window.
    waited = REGISTRY.get_sample_value("mm_coalescer_queue_wait_seconds_sum", {"coalescer": name})
    assert waited >= 0.030
    assert [r.patch_counts for r in tower.log] == [(16,)]


async def test_window_policy_dispatches_a_full_bucket_without_waiting():
    tower = FakeTower()
    async with Coalescer(tower, config(dispatch="window", max_wait_ms=10_000, max_batch_items=4)) as co:
        async with asyncio.timeout(2):
            await co.encode([image(16) for _ in range(4)])
    assert [r.patch_counts for r in tower.log] == [(16,) * 4]


async def test_rare_resolution_is_not_starved_by_a_busy_bucket():
    tower = FakeTower(fixed_s=0.005)
    async with Coalescer(tower, config(max_wait_ms=20, max_batch_items=8)) as co:
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                await asyncio.gather(*(co.encode([image(16)]) for _ in range(16)))

        flooders = [asyncio.create_task(flood()) for _ in range(4)]
        await until(lambda: len(tower.log) >= 4)  # the flood is running
        submitted_at = len(tower.log)
        rare = image(64)
        # The flood never ends before the rare unit is served: a starving policy never serves it.
        assert_outputs([rare], await asyncio.wait_for(co.encode([rare]), timeout=10))
        stop.set()
        await asyncio.gather(*flooders)
    rare_at = next(i for i, r in enumerate(tower.log) if r.patch_counts == (64,))
    # Forwards are serial and each takes >= 5 ms, so at most ~4 run while it ages (20 ms); then the
    # next free slot (up to 2 batches in flight) takes it. A starving policy would let the flood go first.
    assert rare_at - submitted_at <= 10, rare_at - submitted_at


# 5. order ------------------------------------------------------------------------------------
async def test_results_follow_input_order_across_buckets_batches_and_videos():
    tower = FakeTower(ragged=False)
    async with Coalescer(tower, config(max_batch_items=2)) as co:
        items = [image(64), video(3, 16), image(16), image(256), video(2, 64), image(16)]
        outs = await co.encode(items)
    assert_outputs(items, outs)
    assert outs[1].shape == (3 * 16, 2)
    assert len(tower.log) > 3


async def test_requests_finished_by_one_batch_resolve_in_arrival_order():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    resolved: list[int] = []
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)

        async def request(i: int) -> None:
            await co.encode([image(16)])
            resolved.append(i)

        tasks = [asyncio.create_task(request(i)) for i in range(20)]
        await until(lambda: co.stats()["pending_units"] == 20)
        gate.set()
        await asyncio.gather(first, *tasks)
    assert resolved == list(range(20))


async def test_requests_sharing_a_key_resolve_in_arrival_order_when_the_batch_finishes_them_out_of_order():
    """A = [shared, own], B = [shared]: the batch finishes B (at ``shared``) before A (at ``own``)."""
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    resolved: list[str] = []
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        shared = image(16, key="img-S")
        a_items = [shared, image(16, key="a-own")]
        b_items = [EncodeItem(shared.pixel_values.clone(), 16, key="img-S")]

        async def request(name: str, items: list[EncodeItem]) -> None:
            assert_outputs(items, await co.encode(items))
            resolved.append(name)

        a = asyncio.create_task(request("A", a_items))
        await until(lambda: co.stats()["pending_units"] == 2)
        b = asyncio.create_task(request("B", b_items))
        await until(lambda: co.stats()["dedup_hits"] == 1)
        gate.set()
        await asyncio.gather(first, a, b)
    assert tower.log[1].keys == ("img-S", "a-own")  # one batch, in which B's last unit comes first
    assert resolved == ["A", "B"]


# 6. dedup ------------------------------------------------------------------------------------
async def test_equal_keys_queued_together_are_encoded_once():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        shared = image(16, key="img-A")
        twin = EncodeItem(shared.pixel_values.clone(), 16, key="img-A")
        a = asyncio.create_task(co.encode([shared, image(16)]))
        b = asyncio.create_task(co.encode([twin]))
        await until(lambda: co.stats()["dedup_hits"] == 1)
        gate.set()
        out_a, out_b = await asyncio.gather(a, b)
        await first
    assert torch.equal(out_a[0], out_b[0])
    assert sum(r.keys.count("img-A") for r in tower.log) == 1


async def test_key_joins_work_already_running():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config()) as co:
        shared = image(16, key="img-R")
        a = asyncio.create_task(co.encode([shared]))
        await until(lambda: len(tower.log) == 1)
        b = asyncio.create_task(co.encode([EncodeItem(shared.pixel_values, 16, key="img-R")]))
        await until(lambda: co.stats()["dedup_hits"] == 1)
        gate.set()
        out_a, out_b = await asyncio.gather(a, b)
    assert len(tower.log) == 1 and torch.equal(out_a[0], out_b[0])


async def test_cancelling_one_dedup_waiter_keeps_the_work_for_the_other():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        shared = image(16, key="img-C")
        a = asyncio.create_task(co.encode([shared]))
        b = asyncio.create_task(co.encode([shared]))
        await until(lambda: co.stats()["dedup_hits"] == 1)
        a.cancel()
        await until(a.done)
        gate.set()
        assert_outputs([shared], await b)
        await first
    assert a.cancelled()
    assert sum(r.keys.count("img-C") for r in tower.log) == 1


async def test_dedup_can_be_switched_off():
    tower = FakeTower()
    async with Coalescer(tower, config(dedup=False)) as co:
        shared = image(16, key="same")
        await asyncio.gather(co.encode([shared]), co.encode([shared]))
    assert sum(r.keys.count("same") for r in tower.log) == 2


# 7. cancellation -----------------------------------------------------------------------------
async def test_cancelled_request_units_never_reach_the_tower():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        doomed = asyncio.create_task(co.encode([image(16, key="doomed"), image(64, key="doomed-2")]))
        kept = [image(16)]
        keeper = asyncio.create_task(co.encode(kept))
        await until(lambda: co.stats()["pending_units"] == 3)
        doomed.cancel()
        await until(doomed.done)
        assert co.stats()["pending_units"] == 1
        gate.set()
        assert_outputs(kept, await keeper)
        await first
    seen = {k for r in tower.log for k in r.keys}
    assert not seen & {"doomed", "doomed-2"}


async def test_cancelling_while_running_drops_results_and_leaks_nothing():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config()) as co:
        task = asyncio.create_task(co.encode([image(16, key="k")]))
        await until(lambda: len(tower.log) == 1)
        task.cancel()
        await until(task.done)
        gate.set()
        await until(lambda: co.stats()["inflight_batches"] == 0)
        assert co._jobs_by_key == {}
        item = image(16)
        assert_outputs([item], await co.encode([item]))
    assert pending_tasks() == set()


# 8. error isolation --------------------------------------------------------------------------
async def test_failing_unit_fails_only_its_own_request_with_cause_chained():
    gate = threading.Event()
    tower = FakeTower(fail_keys={"poison"}, gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        good = [[image(16)] for _ in range(7)]
        good_tasks = [asyncio.create_task(co.encode(r)) for r in good]
        bad = asyncio.create_task(co.encode([image(16), image(16, key="poison")]))
        await until(lambda: co.stats()["pending_units"] == 9)
        gate.set()
        for items, task in zip(good, good_tasks, strict=True):
            assert_outputs(items, await task)
        with pytest.raises(EncodeError, match="poison") as info:
            await bad
        await first
    assert isinstance(info.value.__cause__, RuntimeError)
    assert co.stats()["failed_units"] == 1
    assert tower.log[1].patches == 9 * 16 and len(tower.log) > 2  # one batch, then bisected


async def test_video_with_a_poisoned_frame_fails_that_request_only():
    tower = FakeTower(fail_keys={"bad-video"})
    async with Coalescer(tower, config()) as co:
        ok_item = video(4)
        results = await asyncio.gather(co.encode([video(3, key="bad-video")]), co.encode([ok_item]),
                                       return_exceptions=True)
    assert isinstance(results[0], EncodeError)
    assert_outputs([ok_item], results[1])


async def test_out_of_memory_shrinks_the_bucket_budget_and_retries():
    gate = threading.Event()
    tower = FakeTower(capacity_patches=64, gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        items = [image(16) for _ in range(8)]
        task = asyncio.create_task(co.encode(items))
        await until(lambda: co.stats()["pending_units"] == 8)
        gate.set()
        assert_outputs(items, await task)
        await first
        # 128 patches ran out of memory, were bisected into two 64-patch forwards; the budget is now 64.
        assert [r.patches for r in tower.log] == [16, 128, 64, 64]
        assert co.stats()["oom_backoffs"] == 1
        after_oom = len(tower.log)
        more = [image(16) for _ in range(8)]
        assert_outputs(more, await co.encode(more))
        # The planner cuts later batches to the shrunk budget: no forward above it, no second OOM.
        # (Bisection alone would also end in 64-patch forwards, but only after another 128-patch OOM.)
        assert [r.patches for r in tower.log[after_oom:]] == [64, 64]
        assert co.stats()["oom_backoffs"] == 1


async def test_unit_that_alone_runs_out_of_memory_fails_its_request():
    tower = FakeTower(capacity_patches=32)
    async with Coalescer(tower, config()) as co:
        with pytest.raises(EncodeError) as info:
            await co.encode([image(64)])
        assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
        item = image(16)
        assert_outputs([item], await co.encode([item]))


async def test_tower_returning_wrong_number_of_outputs_fails_the_batch_not_the_coalescer():
    class ShortTower(FakeTower):
        def forward(self, units):
            return super().forward(units)[:-1] if len(units) > 1 else super().forward(units)[:0]

    async with Coalescer(ShortTower(), config()) as co:
        with pytest.raises(EncodeError, match="outputs for 1 units"):
            await co.encode([image(16)])


# 9. bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bad_item", "message"),
    [
        ("not an item", "expected EncodeItem"),
        (EncodeItem([1, 2, 3], 16), "must be a torch.Tensor"),
        (EncodeItem(torch.zeros(3), 0), "num_patches must be a positive int"),
        (EncodeItem(torch.zeros(3), -4), "num_patches must be a positive int"),
        (EncodeItem(torch.zeros(3), 2.5), "num_patches must be a positive int"),
        (EncodeItem(torch.zeros(3), 16, modality="audio"), "unknown modality 'audio'"),
        (EncodeItem(torch.zeros(0), 16), "pixel_values is empty"),
        (EncodeItem(torch.zeros(5), 16, modality="video"), "at least one frame"),
        (EncodeItem(torch.zeros(0, 4), 16, modality="video"), "at least one frame"),
        (EncodeItem(torch.zeros(3, 4), 16, modality="video", meta={"num_frames": 4}), "meta\\['num_frames'\\] says 4"),
        (EncodeItem(torch.zeros(3), 16, key=["unhashable"]), "key must be hashable"),
    ],
)
async def test_bad_input_fails_that_call_only_and_enqueues_nothing(bad_item, message):
    tower = FakeTower()
    async with Coalescer(tower, config()) as co:
        with pytest.raises(InvalidItemError, match=message):
            await co.encode([image(16), bad_item])
        assert co.stats()["pending_units"] == 0 and tower.log == []
        item = image(16)
        assert_outputs([item], await co.encode([item]))


async def test_encode_rejects_a_bare_item_instead_of_a_sequence():
    async with Coalescer(FakeTower(), config()) as co:
        with pytest.raises(InvalidItemError, match="sequence of EncodeItem"):
            await co.encode(image(16))


async def test_tower_validate_hook_turns_malformed_input_into_invalid_item_error():
    class CheckedTower(FakeTower):
        def validate(self, item: EncodeItem) -> None:
            if item.pixel_values.shape[-1] != 4:
                raise ValueError(f"expected 4 channels last, got shape {tuple(item.pixel_values.shape)}")

    async with Coalescer(CheckedTower(), config()) as co:
        with pytest.raises(InvalidItemError, match="item 0: expected 4 channels last"):
            await co.encode([EncodeItem(torch.zeros(3, 5), 16)])
        fine = image(16)
        assert_outputs([fine], await co.encode([fine]))


async def test_empty_request_returns_empty_list():
    async with Coalescer(FakeTower(), config()) as co:
        assert await co.encode([]) == []


# 10. backpressure ----------------------------------------------------------------------------
async def test_queue_full_rejects_at_once():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config(max_queue_patches=100)) as co:
        first = await hold_tower_busy(co, gate)
        queued = asyncio.create_task(co.encode([image(64)]))
        await until(lambda: co.stats()["pending_patches"] == 64)
        with pytest.raises(QueueFullError, match="max_queue_patches is 100"):
            await co.encode([image(64)])
        gate.set()
        await asyncio.gather(first, queued)
        assert co.stats()["rejected_requests"] == 1


async def test_queue_full_wait_mode_waits_for_space_then_runs():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config(max_queue_patches=100, queue_full="wait")) as co:
        first = await hold_tower_busy(co, gate)
        queued = asyncio.create_task(co.encode([image(64)]))
        await until(lambda: co.stats()["pending_patches"] == 64)
        waiting_item = image(64)
        waiting = asyncio.create_task(co.encode([waiting_item]))
        await settle()  # it has reached its wait for queue space
        assert not waiting.done() and co.stats()["pending_patches"] == 64
        assert co.stats()["requests"] == 2 and co.stats()["rejected_requests"] == 0  # waiting, not admitted
        gate.set()
        assert_outputs([waiting_item], await waiting)
        await asyncio.gather(first, queued)


async def test_request_larger_than_the_whole_queue_is_rejected_even_in_wait_mode():
    async with Coalescer(FakeTower(), config(max_queue_patches=100, queue_full="wait")) as co:
        with pytest.raises(QueueFullError):
            await co.encode([image(64), image(64)])


# 11. shutdown --------------------------------------------------------------------------------
async def test_close_finishes_queued_work_by_default():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    co = await Coalescer(tower, config()).start()
    first = await hold_tower_busy(co, gate)
    items = [image(16) for _ in range(5)]
    task = asyncio.create_task(co.encode(items))
    await until(lambda: co.stats()["pending_units"] == 5)
    closing = asyncio.create_task(co.aclose())
    await until(lambda: co.stats()["closed"])  # closing began while the work was still queued
    assert co.stats()["pending_units"] == 5
    gate.set()
    await closing
    assert_outputs(items, await task)
    await first
    with pytest.raises(CoalescerClosedError):
        await co.encode([image(16)])
    assert pending_tasks() == set()


async def test_close_with_cancel_pending_fails_queued_work_and_finishes_running_work():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    co = await Coalescer(tower, config()).start()
    running = await hold_tower_busy(co, gate)
    queued = asyncio.create_task(co.encode([image(16), image(64)]))
    await until(lambda: co.stats()["pending_units"] == 2)
    closing = asyncio.create_task(co.aclose(cancel_pending=True))
    await until(queued.done)  # failed by the close while the tower still held the first batch
    assert not running.done()
    gate.set()
    await closing
    await running  # it was already on the tower: it completes
    with pytest.raises(CoalescerClosedError):
        await queued
    assert len(tower.log) == 1 and co.stats()["pending_units"] == 0
    assert pending_tasks() == set()


async def test_close_wakes_requests_waiting_for_queue_space():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    co = await Coalescer(tower, config(max_queue_patches=100, queue_full="wait")).start()
    first = await hold_tower_busy(co, gate)
    queued = asyncio.create_task(co.encode([image(64)]))
    await until(lambda: co.stats()["pending_patches"] == 64)
    waiting = asyncio.create_task(co.encode([image(64)]))
    await until(lambda: len(co._space_freed._waiters) == 1)  # it waits for queue space
    closing = asyncio.create_task(co.aclose(cancel_pending=True))
    gate.set()
    await closing
    with pytest.raises(CoalescerClosedError):
        await waiting
    with pytest.raises(CoalescerClosedError):
        await queued
    await first


async def test_encode_before_start_is_refused():
    co = Coalescer(FakeTower(), config())
    with pytest.raises(CoalescerClosedError, match="not started"):
        await co.encode([image(16)])


# 12. metrics ---------------------------------------------------------------------------------
async def test_stats_and_prometheus_metrics_count_the_work():
    from prometheus_client import REGISTRY

    name = "metrics-test"
    tower = FakeTower(fail_keys={"bad"})
    labels = {"coalescer": name}
    before_units = REGISTRY.get_sample_value("mm_coalescer_units_total", labels) or 0.0
    async with Coalescer(tower, config(name=name)) as co:
        await co.encode([image(16), image(16, key="k"), image(16, key="k")])
        with pytest.raises(EncodeError):
            await co.encode([image(16, key="bad")])
        stats = co.stats()
    assert stats["units"] == 4 and stats["requests"] == 2 and stats["dedup_hits"] == 1
    assert stats["failed_units"] == 1 and stats["forwards"] >= 2 and stats["mean_patches_per_forward"] > 0
    assert REGISTRY.get_sample_value("mm_coalescer_units_total", labels) == before_units + 4
    assert REGISTRY.get_sample_value("mm_coalescer_dedup_hits_total", labels) >= 1
    assert REGISTRY.get_sample_value("mm_coalescer_errors_total", {**labels, "kind": "encode"}) >= 1
    assert REGISTRY.get_sample_value("mm_coalescer_patches_per_forward_count", labels) >= 2


# 13. executor --------------------------------------------------------------------------------
async def test_forward_runs_off_the_event_loop_thread_and_loop_keeps_accepting():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config()) as co:
        first = await hold_tower_busy(co, gate)
        accepted = asyncio.create_task(co.encode([image(16)]))
        await until(lambda: co.stats()["pending_units"] == 1)  # the loop is free while the tower is busy
        gate.set()
        await asyncio.gather(first, accepted)
    assert all(r.thread.startswith("mm-forward-") for r in tower.log)
    assert threading.current_thread().name not in {r.thread for r in tower.log}


def test_a_batchs_launch_time_sums_its_forward_calls_bisection_retries_included():
    from mm_scheduler.executor import Executor

    executor = Executor(FakeTower(fixed_s=0.02, fail_keys={"bad"}), torch.device("cpu"))
    assert executor.run([image(16)]).launch_seconds >= 0.02
    bisected = executor.run([image(16, key="bad"), image(16)])  # the pair, then each unit alone
    assert len(bisected.forward_sizes) == 3 and bisected.launch_seconds >= 0.02  # the good unit's forward
    assert bisected.launch_seconds == pytest.approx(sum(bisected.forward_seconds))  # no completion wait on CPU


async def test_each_batchs_launch_time_is_exported_beside_its_dispatch_to_result_time():
    from prometheus_client import REGISTRY

    labels = {"coalescer": "launch-time-test"}

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(f"mm_coalescer_{name}", labels) or 0.0

    before = {name: sample(name) for name in ("batch_launch_seconds_sum", "batch_launch_seconds_count",
                                              "batch_seconds_sum")}
    async with Coalescer(FakeTower(fixed_s=0.02), config(name=labels["coalescer"])) as co:
        await co.encode([image(16)])
    after = {name: sample(name) - value for name, value in before.items()}
    assert after["batch_launch_seconds_count"] == 1
    assert 0.02 <= after["batch_launch_seconds_sum"] <= after["batch_seconds_sum"]


async def test_a_batchs_dispatch_to_result_time_does_not_follow_a_coarse_loop_clock():
    """uvloop's clock counts whole milliseconds; here the loop's clock counts whole seconds, so a batch timed on
    it would read 0 s (or 1 s) for a 20 ms forward."""
    import math

    from prometheus_client import REGISTRY

    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.BaseEventLoop):
        pytest.skip("uvloop's clock cannot be replaced (it is the millisecond one)")
    fine = loop.time
    loop.time = lambda: float(math.floor(fine()))  # type: ignore[method-assign]
    labels = {"coalescer": "coarse-clock-test"}
    before = REGISTRY.get_sample_value("mm_coalescer_batch_seconds_sum", labels) or 0.0
    try:
        async with Coalescer(FakeTower(fixed_s=0.02), config(name=labels["coalescer"])) as co:
            await co.encode([image(16)])
    finally:
        del loop.time
    batch = REGISTRY.get_sample_value("mm_coalescer_batch_seconds_sum", labels) - before
    assert 0.02 <= batch < 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_results_are_correct_on_a_dedicated_stream():
    class CudaTower(FakeTower):
        device = "cuda"

        def forward(self, units):
            outs = super().forward(units)
            return [o.cuda(non_blocking=True) * 1.0 for o in outs]

    tower = CudaTower()
    tower.device = "cuda"
    async with Coalescer(tower, config()) as co:
        assert co._executor.stream is not None
        items = [image(16) for _ in range(32)]
        outs = await co.encode(items)
    for item, out in zip(items, outs, strict=True):
        assert torch.equal(out.cpu(), expected_encoding(item))


async def test_a_failing_dispatcher_closes_the_coalescer_instead_of_hanging_callers(monkeypatch):
    async with Coalescer(FakeTower(), config()) as co:
        def broken(*args, **kwargs):
            raise RuntimeError("planner bug")

        monkeypatch.setattr(co._planner, "next_batch", broken)
        with pytest.raises(CoalescerClosedError, match="dispatcher failed"):
            await asyncio.wait_for(co.encode([image(16)]), timeout=5)
        with pytest.raises(CoalescerClosedError):
            await co.encode([image(16)])


@pytest.mark.parametrize("max_inflight", [1, 2])
async def test_back_to_back_requests_complete_with_any_inflight_limit(max_inflight):
    tower = FakeTower(fixed_s=0.05)
    async with Coalescer(tower, config(max_inflight_batches=max_inflight)) as co:
        first = asyncio.create_task(co.encode([image(16)]))
        await until(lambda: len(tower.log) == 1)  # the second arrives while the first's forward runs
        second_item = image(16)
        second = asyncio.create_task(co.encode([second_item]))
        async with asyncio.timeout(5):
            await first
            assert_outputs([second_item], await second)


# handover ------------------------------------------------------------------------------------
@pytest.mark.parametrize("handover", ["complete", "enqueued"])
async def test_either_handover_delivers_every_result_once_in_order_and_counts_each_forward_once(handover):
    """On CPU a batch is complete when its forward returns, so ``enqueued`` delivers from the launch callback:
    the same results, with nothing to wait for, and the batch is still recorded and freed exactly once."""
    tower = FakeTower(ragged=False, fixed_s=0.002)
    async with Coalescer(tower, config(max_batch_items=4, handover=handover)) as co:
        requests = [[image(16), video(3, 16), image(64)] for _ in range(6)]
        outs = await asyncio.gather(*(co.encode(items) for items in requests))
        stats = co.stats()
    for items, out in zip(requests, outs, strict=True):
        assert isinstance(out, Encoded) and out.events == ()
        assert_outputs(items, out)
    assert stats["forwards"] == len(tower.log) and stats["units"] == 6 * 5
    assert stats["inflight_batches"] == 0 and stats["pending_units"] == 0


async def test_enqueued_handover_still_fails_only_the_failing_units_request():
    tower = FakeTower(fail_keys={"bad"})
    async with Coalescer(tower, config(handover="enqueued")) as co:
        good, bad = image(16), EncodeItem(torch.ones(16, 2), 16, key="bad")
        results = await asyncio.gather(co.encode([good]), co.encode([bad]), return_exceptions=True)
    assert_outputs([good], results[0])
    assert isinstance(results[1], EncodeError)


def test_host_outputs_of_a_cuda_batch_wait_for_completion_and_cuda_outputs_or_failures_do_not():
    """A non-blocking device-to-host copy may still be filling a host output (the EPD tower's): only CUDA tensors,
    which a consumer's stream can wait for, and failures may go out before the batch's event completed."""
    class OnDevice(torch.Tensor):  # stands for a CUDA tensor
        @property
        def is_cuda(self) -> bool:
            return True

    pending = object()  # stands for a recorded CUDA event
    on_device = torch.ones(2).as_subclass(OnDevice)
    assert deliverable_at_launch(BatchOutcome(outputs=[torch.ones(2)]))  # CPU batch: complete already
    assert deliverable_at_launch(BatchOutcome(outputs=[on_device, RuntimeError("x")], done=pending))
    assert not deliverable_at_launch(BatchOutcome(outputs=[on_device, torch.ones(2)], done=pending))


def test_join_without_a_cuda_stream_assembles_and_passes_the_events_on():
    frames = [torch.ones(2, 2), torch.zeros(3, 2), torch.full((1, 2), 5.0)]
    events = ("e1",)
    results, waited = join(frames, [(0, 2), (2, 3)], None, events)
    assert waited == events
    assert torch.equal(results[0], torch.cat(frames[:2])) and results[1] is frames[2]


async def test_enqueued_handover_delivers_at_launch_while_the_batch_is_still_running_on_the_device(monkeypatch):
    """Wiring, with a stand-in completion event that stays pending until the test sets it (the predicate for what
    may go out early is tested above): the caller has its results and the event to wait for, and the batch keeps
    its in-flight slot until the event completes."""
    from mm_scheduler import coalescer as coalescer_module

    gate = threading.Event()

    class PendingEvent:
        def query(self) -> bool:
            return gate.is_set()

        def synchronize(self) -> None:
            gate.wait(10)

        def elapsed_time(self, _other) -> float:
            return 0.0

    pending = PendingEvent()
    async with Coalescer(FakeTower(), config(handover="enqueued")) as co:
        run = co._executor.run

        def run_on_device(units):
            outcome = run(units)
            outcome.started = outcome.done = pending
            return outcome

        monkeypatch.setattr(co._executor, "run", run_on_device)
        monkeypatch.setattr(coalescer_module, "deliverable_at_launch", lambda outcome: True)
        item = image(16)
        out = await asyncio.wait_for(co.encode([item]), timeout=5)
        assert_outputs([item], out)
        assert out.events == (pending,) and co.stats()["inflight_batches"] == 1
        gate.set()
        await until(lambda: co.stats()["inflight_batches"] == 0)
