"""``BatchOutcome.gpu_seconds`` / ``mm_coalescer_batch_gpu_seconds``: a batch's own time on the encoder stream.

The host-side ``mm_coalescer_batch_seconds`` (dispatch to results ready) of a batch queued behind another on the
stream includes the other's time, and so did every "encoder busy" figure read from it on the real server. These
tests queue GPU sleeps of known length and check the event-based time counts a batch's own forwards only: not the
batch ahead of it on the stream, not the producer of its inputs. Needs CUDA.
"""

from __future__ import annotations

import time

import pytest
import torch

from mm_scheduler import Coalescer, CoalescerConfig, EncodeItem
from mm_scheduler import metrics as mm_metrics
from mm_scheduler.executor import Executor

from .helpers import SleepingTower, calibrated_sleep, current_gpu, gpu_unit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_a_batch_queued_behind_another_counts_only_its_own_stream_time():
    cycles, forward_s = calibrated_sleep(0.05)
    executor = Executor(SleepingTower(cycles), current_gpu())
    dispatched = time.monotonic()
    first, second = executor.run([gpu_unit()]), executor.run([gpu_unit()])  # both queued before either ran
    second.done.synchronize()
    host_s = time.monotonic() - dispatched
    assert host_s > 1.6 * forward_s  # the second's dispatch-to-result covered both forwards
    for outcome in (first, second):
        assert 0.6 * forward_s < outcome.gpu_seconds() < 1.4 * forward_s  # one forward, not two


def test_the_wait_for_a_slow_producer_of_the_inputs_is_not_counted():
    cycles, forward_s = calibrated_sleep(0.03)
    executor = Executor(SleepingTower(cycles), current_gpu())
    producer = torch.cuda.Stream()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(4 * cycles)  # the inputs land four forwards from now
        pixels = torch.ones(4, 8, device="cuda")
        ready = torch.cuda.Event()
        ready.record()
    outcome = executor.run([EncodeItem(pixels, 4, ready=ready)])
    outcome.done.synchronize()
    assert 0.6 * forward_s < outcome.gpu_seconds() < 1.4 * forward_s  # not the producer's four
    assert torch.equal(outcome.outputs[0], pixels * 2)


async def test_the_coalescer_exports_each_batchs_stream_time():
    cycles, forward_s = calibrated_sleep(0.02)
    tower = SleepingTower(cycles)
    config = CoalescerConfig(name="gpu-time-test", budget_bytes=1 << 20, bytes_per_patch=4, max_batch_items=1)
    histogram = mm_metrics.BATCH_GPU_SECONDS.labels(coalescer="gpu-time-test")
    before = histogram._sum.get()
    async with Coalescer(tower, config) as co:
        outs = await co.encode([gpu_unit() for _ in range(4)])
    assert all(torch.equal(out, torch.full((4, 8), 2.0, device="cuda")) for out in outs)
    total = histogram._sum.get() - before
    assert 4 * 0.6 * forward_s < total < 4 * 1.4 * forward_s  # four forwards of one unit each (host: ~7)
