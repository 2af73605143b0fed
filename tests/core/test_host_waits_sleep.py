"""The host's waits for the GPU sleep instead of spinning a core (``executor.sleeping_event``). Needs CUDA.

In the real server a plugin server's scheduler process used ~43 CPU-seconds more than the idle servers' schedulers
over a Gemma3 seed burst of ~56 s (e5bb1ae, ``cpu_s`` in the harness results). A thread that waits for a forward with
CUDA's default wait spins a core for the forward's whole length (likely much of that excess, with the blocking copy
of host inputs that ``adapters.stack_on`` no longer makes), a core the tokenizer manager's image processing wants.
Each test queues a GPU sleep of ~0.3 s and measures the waiting thread's (or process's) CPU time; a control wait on a
default event must spin first, or the test skips as inconclusive, so a spinning wait would fail it.

Not tested: a video's join. On the H200 (make gpu-test, 2026-12-04) a blocking event recorded on the join stream
behind another stream's still-running work was waited for at 0.66 of a core: a sleeping event did not make that wait
sleep. The coalescer never waits that way: with ``handover: complete`` it joins only frames whose batches it has
already waited for (asleep, the first test), so its wait for the join covers one concatenation; with ``enqueued``
the join's event goes to the consumer's stream and the host does not wait for it.
"""

from __future__ import annotations

import time

import pytest
import torch

from mm_scheduler import Coalescer, CoalescerConfig
from mm_scheduler.executor import Executor

from .helpers import SleepingTower, calibrated_sleep, cpu_share, current_gpu, gpu_unit, require_spinning_default_wait

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SLEEPING = 0.2  # a sleeping wait's CPU share; a spinning one's is ~1


def test_waiting_for_a_batchs_completion_sleeps_and_then_reads_its_results():
    cycles, _ = calibrated_sleep(0.3)
    require_spinning_default_wait(cycles)
    outcome = Executor(SleepingTower(cycles), current_gpu()).run([gpu_unit()])
    assert cpu_share(outcome.done.synchronize) < SLEEPING
    assert torch.equal(outcome.outputs[0], torch.full((4, 8), 2.0, device="cuda"))


async def test_a_coalescer_waiting_for_long_forwards_leaves_its_process_idle():
    cycles, forward_s = calibrated_sleep(0.3)
    require_spinning_default_wait(cycles)
    config = CoalescerConfig(name="sleeping-wait-test", budget_bytes=1 << 20, bytes_per_patch=4, max_batch_items=1)
    async with Coalescer(SleepingTower(cycles), config) as co:
        await co.encode([gpu_unit()])  # the forward thread's first launch (CUDA context, kernel load) is not the wait
        for units in (1, 3):  # a lone batch's wait is on the forward thread; queued batches' on the event waiters
            wall, cpu = time.perf_counter(), time.process_time()
            outs = await co.encode([gpu_unit() for _ in range(units)])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert all(torch.equal(out, torch.full((4, 8), 2.0, device="cuda")) for out in outs)
            assert wall > (units - 0.5) * forward_s
            assert cpu / wall < SLEEPING, f"{units} unit(s): {cpu:.2f} CPU-s in {wall:.2f} s"
