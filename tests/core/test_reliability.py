"""Reliability: a hung forward never hangs the coalescer, and every failure reaches the caller typed.

Hangs are real (a forward thread blocked with no timeout, see FakeTower's ``hang_keys``); deadlines are
short config values so the tests run fast. Every async test runs on asyncio and uvloop (conftest).
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch

from mm_scheduler import (
    Coalescer,
    CoalescerClosedError,
    CoalescerConfig,
    ConfigError,
    EncodeError,
    ForwardTimeoutError,
    TowerUnhealthyError,
    config_from_dict,
)
from mm_scheduler.executor import BatchOutcome
from mm_scheduler.health import DaemonWorkers, ForwardDeadline
from mm_scheduler.testing import FakeTower, expected_encoding
from mm_scheduler.units import assemble

from .helpers import image, pending_tasks, until, video

DEADLINE_S = 0.2


def config(**overrides) -> CoalescerConfig:
    base = dict(max_wait_ms=1.0, budget_bytes=1024 * 4096, max_queue_patches=1_000_000,
                forward_timeout_s=DEADLINE_S)
    return CoalescerConfig(**{**base, **overrides})


def assert_outputs(items, outputs) -> None:
    assert len(outputs) == len(items)
    for item, out in zip(items, outputs, strict=True):
        assert torch.equal(out, expected_encoding(item))


def sample(name: str, labels: dict[str, str]) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


# 1. a hung forward ----------------------------------------------------------------------------
async def test_hung_forward_fails_its_batch_marks_tower_unhealthy_until_a_probe_succeeds(caplog):
    name = "hang-test"
    labels = {"coalescer": name}
    tower = FakeTower(hang_keys={"hang"})
    timeouts_before = sample("mm_coalescer_forward_timeouts_total", labels)
    try:
        async with Coalescer(tower, config(name=name)) as co:
            warm = image(16)
            assert_outputs([warm], await co.encode([warm]))  # gives the health probe a known-good unit
            tower.capacity_patches = 8  # from now on every probe (16 patches) fails: the tower stays sick
            with caplog.at_level(logging.WARNING, logger="mm_scheduler.coalescer"):
                hung, neighbour = await asyncio.gather(co.encode([image(16, key="hang")]), co.encode([image(16)]),
                                                       return_exceptions=True)
                assert tower.hung_forwards == 1 and set(tower.log[1].keys) >= {"hang"}
                assert len(tower.log[1].keys) == 2, "both requests shared the hung forward"
                for result in (hung, neighbour):
                    assert isinstance(result, ForwardTimeoutError) and isinstance(result, EncodeError)
                assert co.stats()["healthy"] is False
                assert sample("mm_coalescer_tower_healthy", labels) == 0
                assert sample("mm_coalescer_forward_timeouts_total", labels) == timeouts_before + 1

                forwards = len(tower.log)
                with pytest.raises(TowerUnhealthyError, match="unhealthy"):
                    await co.encode([image(16)])
                await until(lambda: co.stats()["health_probes"] >= 2)  # probes ran, and failed
                assert co.stats()["healthy"] is False
                assert all(r.keys == (None,) for r in tower.log[forwards:]), "only probes reached the tower"

                tower.capacity_patches = None  # the tower recovers: the next probe succeeds
                await until(lambda: co.stats()["healthy"], timeout=10)
                assert sample("mm_coalescer_tower_healthy", labels) == 1
                after = [image(16), image(64)]
                assert_outputs(after, await co.encode(after))
            hung_thread = tower.log[1].thread
            assert tower.log[-1].thread != hung_thread, "work moved to a fresh forward thread"
            abandoned = [t for t in threading.enumerate() if t.name == hung_thread]
            assert abandoned and abandoned[0].daemon, "the stuck thread must not block interpreter exit"
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "UNHEALTHY" in errors[0].getMessage()
            assert any("HEALTHY again" in r.getMessage() for r in caplog.records)
            assert co.stats()["stuck_threads"] == 1
            tower.release()
            await until(lambda: co.stats()["stuck_threads"] == 0)
    finally:
        tower.release()
    assert co.stats()["pending_units"] == 0 and co._jobs_by_key == {}
    assert pending_tasks() == set()


async def test_queued_work_is_failed_at_once_when_the_forward_ahead_of_it_hangs():
    tower = FakeTower(hang_keys={"hang"})
    try:
        async with Coalescer(tower, config(max_batch_items=1)) as co:
            hung = asyncio.create_task(co.encode([image(16, key="hang")]))
            await asyncio.to_thread(tower.hanging.wait, 5)
            queued = asyncio.create_task(co.encode([image(16), image(16)]))
            await until(lambda: co.stats()["pending_units"] == 2)
            with pytest.raises(ForwardTimeoutError):
                await hung
            with pytest.raises(TowerUnhealthyError):
                await queued
            assert co.stats()["pending_units"] == 0 and len(tower.log) == 1
            tower.release()
            await until(lambda: co.stats()["healthy"])
    finally:
        tower.release()


async def test_without_a_known_good_unit_the_hung_forward_returning_restores_health():
    tower = FakeTower(hang_keys={"hang"})
    try:
        async with Coalescer(tower, config()) as co:
            with pytest.raises(ForwardTimeoutError):
                await co.encode([image(16, key="hang")])
            assert co.stats()["healthy"] is False
            tower.release()  # the stuck forward finally returns
            await until(lambda: co.stats()["healthy"])
            assert co.stats()["health_probes"] == 0 and co.stats()["stuck_threads"] == 0
            item = image(16)
            assert_outputs([item], await co.encode([item]))
    finally:
        tower.release()


@pytest.mark.parametrize("inline", [True, False], ids=["on-forward-thread", "on-event-waiter"])
async def test_a_completion_wait_that_never_ends_also_trips_the_deadline(inline):
    """On CUDA the forward returns at once and the wait for its event is what hangs (a stuck kernel)."""
    never = threading.Event()

    class StuckEvent:
        def query(self) -> bool:
            return never.is_set()

        def synchronize(self) -> None:
            never.wait()

    tower = FakeTower()
    try:
        async with Coalescer(tower, config()) as co:
            co._sync_lone_inline = inline  # who waits for a lone batch's event: its forward thread or a waiter
            await co.encode([image(16)])  # a known-good unit for the health probe
            real_run = co._executor.run

            def run_with_stuck_event(units):
                outcome: BatchOutcome = real_run(units)
                if any(u.key == "stuck" for u in units):
                    outcome.done = StuckEvent()
                return outcome

            co._executor.run = run_with_stuck_event
            with pytest.raises(ForwardTimeoutError, match="completion event"):
                await co.encode([image(16, key="stuck")])
            assert co.stats()["forward_timeouts"] == 1
            await until(lambda: co.stats()["healthy"])  # the probe (a good unit) succeeds on a fresh thread
    finally:
        never.set()


SPIN_CYCLES = 10_000_000_000  # torch.cuda._sleep: about 5-7 s of one GPU block spinning at 1.4-2 GHz


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("inline", [True, False], ids=["on-forward-thread", "on-event-waiter"])
async def test_cuda_kernel_past_the_deadline_is_abandoned_and_a_fresh_stream_serves_meanwhile(inline):
    """A real kernel that outlives the deadline cannot be killed: the coalescer moves to a new stream
    and thread, a probe succeeds there while the old kernel still spins, and the abandoned waiter
    returns only when that kernel ends."""

    class SpinTower(FakeTower):
        def forward(self, units):
            outputs = [out.cuda() for out in super().forward(units)]
            if any(u.key == "spin" for u in units):
                torch.cuda._sleep(SPIN_CYCLES)  # queued on the coalescer's stream after the outputs
            return outputs

    tower = SpinTower()
    tower.device = "cuda"
    async with Coalescer(tower, config(forward_timeout_s=0.5)) as co:
        co._sync_lone_inline = inline
        warm = image(16)
        assert torch.equal((await co.encode([warm]))[0].cpu(), expected_encoding(warm))
        spinning_stream = co._executor.stream
        with pytest.raises(ForwardTimeoutError, match="completion event"):
            await co.encode([image(16, key="spin")])
        await until(lambda: co.stats()["healthy"], timeout=10)
        assert co._executor.stream is not spinning_stream
        assert co.stats()["stuck_threads"] == 1, "healthy again while the old kernel still spins"
        item = image(64)
        assert torch.equal((await co.encode([item]))[0].cpu(), expected_encoding(item))
        await until(lambda: co.stats()["stuck_threads"] == 0, timeout=60)


async def test_a_failing_async_with_body_fails_queued_work_and_tears_down_fast():
    """Issue 13: a failed assertion with the fake tower's gate closed used to cost 30 s per gated forward."""
    gate = threading.Event()
    tower = FakeTower(gate=gate, gate_timeout_s=0.2)
    outcome: dict[str, BaseException | list] = {}
    with pytest.raises(AssertionError, match="boom"):
        async with Coalescer(tower, config(forward_timeout_s="auto")) as co:
            running = asyncio.create_task(co.encode([image(16), image(16)]))
            await until(lambda: len(tower.log) == 1)
            queued = asyncio.create_task(co.encode([image(16)]))
            await until(lambda: co.stats()["pending_units"] == 1)
            raise AssertionError("boom")
    outcome["running"], outcome["queued"] = await asyncio.gather(running, queued, return_exceptions=True)
    assert isinstance(outcome["queued"], CoalescerClosedError)
    assert isinstance(outcome["running"], EncodeError) and isinstance(outcome["running"].__cause__, TimeoutError)
    assert len(tower.log) == 3  # the gated batch, then its two halves failing at once (the gate had expired)


async def test_released_fake_tower_opens_its_gate():
    gate = threading.Event()
    tower = FakeTower(gate=gate)
    async with Coalescer(tower, config()) as co:
        task = asyncio.create_task(co.encode([image(16)]))
        await until(lambda: len(tower.log) == 1)
        tower.release()
        await task
    assert gate.is_set()


# 2. errors keep their type --------------------------------------------------------------------
async def test_video_frames_of_mismatched_width_fail_that_request_with_encode_error():
    tower = FakeTower(malformed_keys={"bad-video"})
    async with Coalescer(tower, config()) as co:
        good = [video(3), image(16)]
        bad, twin, fine = await asyncio.gather(
            co.encode([video(3, key="bad-video")]), co.encode([video(3, key="bad-video")]), co.encode(good),
            return_exceptions=True)
        assert_outputs(good, fine)
        for result in (bad, twin):
            assert type(result) is EncodeError, f"got {type(result).__name__}: {result}"
            assert isinstance(result.__cause__, RuntimeError) and "cannot be joined" in str(result)
        assert co.stats()["pending_units"] == 0


async def test_non_tensor_output_fails_only_that_unit_with_encode_error():
    tower = FakeTower(malformed_keys={"bad-image"})
    async with Coalescer(tower, config()) as co:
        good = [image(16)]
        bad, fine = await asyncio.gather(co.encode([image(16), image(16, key="bad-image")]), co.encode(good),
                                         return_exceptions=True)
    assert type(bad) is EncodeError and "returned a list" in str(bad)
    assert_outputs(good, fine)
    assert len(tower.log) == 1, "one forward: a garbage output fails its unit without bisecting the batch"


async def test_tower_returning_none_is_an_encode_error():
    class NoneTower(FakeTower):
        def forward(self, units):
            super().forward(units)

    async with Coalescer(NoneTower(), config()) as co:
        with pytest.raises(EncodeError) as info:
            await co.encode([image(16)])
    assert isinstance(info.value.__cause__, TypeError)


def test_assemble_turns_unjoinable_frames_into_encode_error():
    frames = [torch.zeros(4, 2), torch.zeros(4, 3), "junk"]
    with pytest.raises(EncodeError, match=r"item 1: .*cannot be joined") as info:
        assemble([torch.zeros(1, 2), *frames[:2]], [(0, 1), (1, 3)])
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(EncodeError, match="cannot be joined") as info:
        assemble([torch.zeros(4, 2), "junk"], [(0, 2)])
    assert isinstance(info.value.__cause__, TypeError)
    ok = assemble([torch.ones(2, 2), torch.ones(3, 2)], [(0, 2)])
    assert ok[0].shape == (5, 2)


# 3. the deadline itself -----------------------------------------------------------------------
def test_deadline_off_fixed_and_automatic():
    assert ForwardDeadline(None).seconds is None and ForwardDeadline(0).seconds is None
    fixed = ForwardDeadline(2.5)
    assert fixed.seconds == 2.5 and fixed.observe(100.0) is False and fixed.seconds == 2.5
    auto = ForwardDeadline("auto")
    assert auto.seconds == ForwardDeadline.WARMUP_S
    for _ in range(ForwardDeadline.WARMUP_FORWARDS - 1):
        auto.observe(0.01)
    assert auto.seconds == ForwardDeadline.WARMUP_S  # still warming up
    assert auto.observe(0.01) is True and auto.seconds == ForwardDeadline.FLOOR_S  # fast forwards: the floor
    for _ in range(ForwardDeadline.WINDOW):
        auto.observe(2.0)
    assert auto.p99() == 2.0 and auto.seconds == 40.0  # slow forwards: 20 x p99


def test_p99_is_the_nearest_rank():
    deadline = ForwardDeadline("auto")
    for value in range(1, 101):
        deadline.observe(float(value))
    assert deadline.p99() == 99.0


@pytest.mark.parametrize("value", [-1, "soon", float("nan"), float("inf"), True])
def test_invalid_forward_timeout_is_an_error_naming_the_key(value):
    with pytest.raises(ConfigError, match="'forward_timeout_s'"):
        config_from_dict({"forward_timeout_s": value}, source="test.yaml")


@pytest.mark.parametrize(("value", "seconds"), [("auto", ForwardDeadline.WARMUP_S), (0, None), (None, None),
                                                (2.5, 2.5)])
def test_valid_forward_timeouts_give_the_documented_deadline(value, seconds):
    cfg = config_from_dict({"forward_timeout_s": value})
    assert Coalescer(FakeTower(), cfg).stats()["forward_deadline_s"] == seconds


def test_daemon_workers_cancel_queued_work_on_shutdown_and_refuse_more():
    workers = DaemonWorkers(1, "test-workers")
    started, release = threading.Event(), threading.Event()

    def block() -> bool:
        started.set()
        return release.wait()

    running = workers.submit(block)
    assert started.wait(5)
    queued = workers.submit(lambda: "never")
    workers.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled() and not running.cancelled()
    with pytest.raises(RuntimeError):
        workers.submit(lambda: None)
    release.set()
    assert running.result(timeout=5) is True
    assert all(t.daemon for t in workers._threads)

