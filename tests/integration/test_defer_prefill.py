"""``defer_prefill_ms``: requests whose early encode is unfinished sit out prefill batches, and the scheduler
loop goes on taking requests in instead of blocking inside a prefill."""

from __future__ import annotations

import time
from array import array
from types import SimpleNamespace

import pytest
from mm_scheduler_sglang import sglang_plugin
from mm_scheduler_sglang.service import EncoderService
from test_service import SumTower, item

from mm_scheduler import CoalescerConfig

pytestmark = pytest.mark.timeout(60)  # tests wait on gates and threads: a hang fails fast


def _req(rid: str):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    return Req(rid, "", array("i", [1, 2, 3]), SamplingParams(max_new_tokens=4))


def _scheduler(queue: list, mode: str = "NULL", chunked=None) -> SimpleNamespace:
    """The scheduler attributes the deferral reads, with SGLang's real disaggregation mode."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    return SimpleNamespace(waiting_queue=queue, disaggregation_mode=DisaggregationMode[mode], chunked_req=chunked)


def _running(n: int):
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    return ScheduleBatch(reqs=[_req(f"running{i}") for i in range(n)])


@pytest.fixture
def service(monkeypatch):
    tower = SumTower()
    svc = EncoderService(tower, CoalescerConfig(budget_bytes=1 << 20, bytes_per_patch=64), lockstep=False).start()
    monkeypatch.setattr(sglang_plugin, "_service", svc)
    monkeypatch.setattr(sglang_plugin, "_defer_prefill_s", 0.5)
    monkeypatch.setattr(sglang_plugin, "_deferred_since", {})
    monkeypatch.setattr(sglang_plugin, "_bound_spent", set())
    yield svc
    tower.gate.set()
    svc.close()


def _prefill_admitting_everything(seen: list):
    """Stands in for SGLang's get_new_batch_prefill: admits every waiting request, as it would with room."""
    def original(scheduler, running_batch):
        seen.append([req.rid for req in scheduler.waiting_queue])
        admitted = list(scheduler.waiting_queue)
        scheduler.waiting_queue = []
        return admitted
    return original


def test_unfinished_encode_sits_out_while_decode_runs_and_the_queue_keeps_its_order(service):
    service.tower.gate.clear()  # the encodes cannot finish
    service.on_arrival("slow", [item(1)])
    queue = [_req("text-only"), _req("slow"), _req("other")]
    scheduler = _scheduler(queue)
    seen: list = []
    admitted = sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler,
                                                            _running(2))
    assert seen == [["text-only", "other"]]
    assert [r.rid for r in admitted] == ["text-only", "other"]
    assert [r.rid for r in scheduler.waiting_queue] == ["slow"]


def test_a_ready_request_goes_at_once(service):
    service.on_arrival("fast", [item(2)])
    deadline = time.monotonic() + 20
    while not service.ready("fast"):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    scheduler = _scheduler([_req("fast")])
    seen: list = []
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler, _running(1))
    assert seen == [["fast"]]


@pytest.mark.parametrize("running", [None, 0], ids=["no-running-batch", "empty-running-batch"])
def test_with_nothing_else_to_run_the_scheduler_waits_a_slice_outside_the_prefill_and_returns_to_intake(
        service, running, monkeypatch):
    """A blocked prefill would stop the scheduler loop taking requests in: the call returns without a batch
    after one wait slice, the requests keep their places and their deferral bound runs."""
    slices: list = []
    wait_for_any = service.wait_for_any
    monkeypatch.setattr(service, "wait_for_any", lambda rids, timeout_s: (slices.append((list(rids), timeout_s)),
                                                                         wait_for_any(rids, timeout_s)))
    service.tower.gate.clear()
    service.on_arrival("slow", [item(3)])
    service.on_arrival("slower", [item(5)])
    scheduler = _scheduler([_req("slow"), _req("slower")])
    seen: list = []
    admitted = sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler,
                                                            None if running is None else _running(running))
    assert seen == [[]] and admitted == []
    assert slices == [(["slow", "slower"], sglang_plugin.INTAKE_SLICE_S)]
    assert [r.rid for r in scheduler.waiting_queue] == ["slow", "slower"]
    assert set(sglang_plugin._deferred_since) == {"slow", "slower"}


def test_an_encode_that_finishes_during_the_wait_slice_goes_into_this_prefill(service, monkeypatch):
    def encode_finishes(rids, timeout_s):
        service.tower.gate.set()
        deadline = time.monotonic() + 20
        while not service.ready("slow"):
            assert time.monotonic() < deadline
            time.sleep(0.005)

    service.tower.gate.clear()
    service.on_arrival("slow", [item(3)])
    monkeypatch.setattr(service, "wait_for_any", encode_finishes)
    scheduler = _scheduler([_req("slow")])
    seen: list = []
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler, None)
    assert seen == [["slow"]] and "slow" not in sglang_plugin._deferred_since


def test_past_its_bound_a_request_goes_into_the_prefill_even_with_nothing_else_to_run(service, monkeypatch):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(sglang_plugin.time, "monotonic", lambda: clock.now)
    monkeypatch.setattr(service, "wait_for_any", lambda rids, timeout_s: None)
    service.tower.gate.clear()
    service.on_arrival("slow", [item(4)])
    scheduler = _scheduler([_req("slow")])
    seen: list = []
    original = _prefill_admitting_everything(seen)
    sglang_plugin._around_get_new_batch_prefill(original, scheduler, None)
    clock.now += 0.5
    sglang_plugin._around_get_new_batch_prefill(original, scheduler, None)
    assert seen == [[], ["slow"]]


def test_wait_for_any_returns_when_an_encode_finishes_at_once_when_one_is_ready_and_sleeps_with_nothing_to_wait_on(
        service, monkeypatch):
    import threading

    service.tower.gate.clear()
    service.on_arrival("slow", [item(8)])
    threading.Timer(0.05, service.tower.gate.set).start()
    started = time.monotonic()
    service.wait_for_any(["slow"], timeout_s=30)
    assert time.monotonic() - started < 20 and service.ready("slow")
    started = time.monotonic()
    service.wait_for_any(["slow"], timeout_s=30)  # ready already
    assert time.monotonic() - started < 20
    monkeypatch.setattr(service._held, "handles_of", lambda rid: None)  # items still deferred for memory
    started = time.monotonic()
    service.wait_for_any(["slow"], timeout_s=0.05)  # nothing to wait on: a sleep, not a busy return
    assert time.monotonic() - started >= 0.05


@pytest.mark.parametrize("running", [None, 0], ids=["no-running-batch", "empty-running-batch"])
def test_without_decode_work_an_unfinished_encode_sits_out_while_ready_requests_are_prefilled(service, running):
    """A burst: the prefill of requests that are ready runs (and the scheduler goes on taking requests in)
    instead of blocking on the head of the queue's encode."""
    service.tower.gate.clear()
    service.on_arrival("slow", [item(6)])
    scheduler = _scheduler([_req("slow"), _req("text-only")])
    seen: list = []
    admitted = sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler,
                                                            None if running is None else _running(running))
    assert seen == [["text-only"]] and [r.rid for r in admitted] == ["text-only"]
    assert [r.rid for r in scheduler.waiting_queue] == ["slow"]


def test_deferral_is_bounded(service, monkeypatch):
    """A request sits out prefill batches for at most ``defer_prefill_ms`` from the first time it did (clock faked)."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(sglang_plugin.time, "monotonic", lambda: clock.now)
    monkeypatch.setattr(sglang_plugin, "_defer_prefill_s", 0.5)
    service.tower.gate.clear()
    service.on_arrival("slow", [item(4)])
    scheduler = _scheduler([_req("slow")])
    seen: list = []
    original = _prefill_admitting_everything(seen)
    sglang_plugin._around_get_new_batch_prefill(original, scheduler, _running(1))
    clock.now += 0.25  # binary-exact steps: the bound is reached exactly
    sglang_plugin._around_get_new_batch_prefill(original, scheduler, _running(1))
    clock.now += 0.25
    sglang_plugin._around_get_new_batch_prefill(original, scheduler, _running(1))
    assert seen == [[], [], ["slow"]]
    assert "slow" not in sglang_plugin._deferred_since  # a later deferral starts a new bound


def test_off_by_default_and_in_lockstep_every_request_is_ready(service, monkeypatch):
    from mm_scheduler_sglang import settings

    assert settings.PLUGIN_DEFAULTS["defer_prefill_ms"] == 0.0
    lockstep = EncoderService(SumTower(), CoalescerConfig(budget_bytes=1 << 20, bytes_per_patch=64),
                              lockstep=True).start()
    lockstep.on_arrival("r", [item(5)])
    assert lockstep.ready("r")  # a rank-local answer must never change what a TP rank schedules


def _prefill_admitting_first(seen: list, calls: list, extra: list | None = None):
    """SGLang's get_new_batch_prefill with room for one request; it may also requeue others (``extra``)."""
    def original(scheduler, running_batch, *args, **kwargs):
        calls.append((running_batch, args, kwargs))
        seen.append([req.rid for req in scheduler.waiting_queue])
        admitted, scheduler.waiting_queue = scheduler.waiting_queue[:1], scheduler.waiting_queue[1:] + (extra or [])
        return admitted
    return original


def test_requests_the_prefill_did_not_admit_and_ones_it_requeued_stay_in_order(service):
    service.tower.gate.clear()
    service.on_arrival("slow", [item(6)])
    queue = [_req("a"), _req("slow"), _req("b"), _req("c")]
    requeued = _req("retracted")
    scheduler = _scheduler(queue)
    seen, calls = [], []
    running = _running(1)
    admitted = sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_first(seen, calls, [requeued]),
                                                            scheduler, running, "arg", key="value")
    assert [r.rid for r in admitted] == ["a"] and seen == [["a", "b", "c"]]
    assert calls == [(running, ("arg",), {"key": "value"})]  # SGLang's own arguments, passed through
    assert [r.rid for r in scheduler.waiting_queue] == ["slow", "b", "c", "retracted"]


@pytest.mark.parametrize("case", ["no-service", "off", "nobody-held-back"])
def test_sglangs_prefill_runs_untouched_when_nothing_is_deferred(service, monkeypatch, case):
    service.tower.gate.clear()
    service.on_arrival("slow", [item(7)])
    running = _running(1)
    if case == "no-service":
        monkeypatch.setattr(sglang_plugin, "_service", None)
    if case == "off":
        monkeypatch.setattr(sglang_plugin, "_defer_prefill_s", 0.0)
    queue = [_req("fast")] if case == "nobody-held-back" else [_req("slow"), _req("fast")]
    scheduler = _scheduler(list(queue))
    seen, calls = [], []
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_first(seen, calls), scheduler, running,
                                                "arg", key="value")
    assert seen == [[r.rid for r in queue]] and calls == [(running, ("arg",), {"key": "value"})]


def test_a_request_ready_again_starts_a_fresh_deferral_bound_next_time(service, monkeypatch):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(sglang_plugin.time, "monotonic", lambda: clock.now)
    ready = {"r": False}
    monkeypatch.setattr(service, "ready", lambda rid: ready[rid])
    req = _req("r")
    assert sglang_plugin._defer(service, req, clock.now)  # held back from 1000.0
    ready["r"] = True
    assert not sglang_plugin._defer(service, req, clock.now)
    assert "r" not in sglang_plugin._deferred_since
    clock.now += 1.0  # past the 0.5 s bound of the first deferral
    ready["r"] = False
    assert sglang_plugin._defer(service, req, clock.now)  # a new deferral, with a new bound


def test_a_request_left_to_its_prefill_goes_after_one_wait_slice_while_the_unfinished_encode_sits_out(
        service, monkeypatch):
    """It is no other work to defer for (its prefill encodes it beside the held-back encodes), so the scheduler
    waits one slice first; then it goes, and the request whose encode is unfinished still sits out."""
    service.tower.gate.clear()
    service.on_arrival("slow", [item(8)])
    monkeypatch.setattr(sglang_plugin, "_left_to_prefill", {"lazy"})
    slices: list = []
    monkeypatch.setattr(service, "wait_for_any", lambda rids, timeout_s: slices.append(list(rids)))
    scheduler = _scheduler([_req("slow"), _req("lazy")])
    seen: list = []
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler, None)
    assert slices == [["slow"]] and seen == [["lazy"]]


def test_a_chunked_prefill_in_progress_is_other_work(service):
    service.tower.gate.clear()
    service.on_arrival("slow", [item(9)])
    scheduler = _scheduler([_req("slow")], chunked=_req("chunked"))
    seen: list = []
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler, None)
    assert seen == [[]] and [r.rid for r in scheduler.waiting_queue] == ["slow"]


def test_a_pd_prefill_server_defers_only_while_decoding_and_never_waits_in_its_loop(service, monkeypatch):
    """Its running batch is always empty, its loop also polls bootstrap and KV transfers, and its bootstrap wait
    is a head start of its own: without decode work nothing is deferred and no wait slice is taken."""
    slices: list = []
    monkeypatch.setattr(service, "wait_for_any", lambda rids, timeout_s: slices.append(list(rids)))
    service.tower.gate.clear()
    service.on_arrival("slow", [item(10)])
    scheduler = _scheduler([_req("slow"), _req("text-only")], mode="PREFILL")
    seen: list = []
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler, None)
    assert slices == [] and seen == [["slow", "text-only"]] and not sglang_plugin._deferred_since
    scheduler.waiting_queue = [_req("slow"), _req("text-only")]
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler, _running(1))
    assert seen[-1] == ["text-only"]  # while it decodes, the unfinished encode sits out


def test_a_bound_started_while_decoding_is_not_reset_when_nothing_else_can_run(service, monkeypatch):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(sglang_plugin.time, "monotonic", lambda: clock.now)
    service.tower.gate.clear()
    service.on_arrival("slow", [item(11)])
    scheduler = _scheduler([_req("slow")])
    sglang_plugin._around_get_new_batch_prefill(lambda scheduler, running: None, scheduler, _running(1))
    assert sglang_plugin._deferred_since == {"slow": 1000.0}  # sat out while decode ran
    clock.now += 0.25
    sglang_plugin._around_get_new_batch_prefill(lambda scheduler, running: None, scheduler, None)  # alone: a slice
    assert sglang_plugin._deferred_since == {"slow": 1000.0}  # its bound keeps running
    clock.now += 0.25
    seen: list = []
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler, _running(1))
    assert seen == [["slow"]]  # 0.5 s since it first sat out: the bound is reached


def test_deferral_is_off_at_tp_above_one_where_ranks_must_form_the_same_batches(caplog):
    import logging

    import sglang_models as sm
    from mm_scheduler_sglang import settings

    caplog.set_level(logging.WARNING, logger="mm_scheduler_sglang")
    model = sm.qwen2_5_vl()
    model.use_data_parallel = True  # --mm-enable-dp-encoder: a collective-free tower, async mode at TP=2
    plugin = {**settings.PLUGIN_DEFAULTS, "defer_prefill_ms": 20.0, "early_encode_min_waiting": 1}
    service = sglang_plugin.start(model, {"config_path": None, "mode": "async", "values": {}, "plugin": plugin},
                                  tp_size=2)
    try:
        assert service.mode == "async"
        assert sglang_plugin._defer_prefill_s == 0.0 and "defer_prefill_ms ignored at TP=2" in caplog.text
        assert not service.inline_when_idle  # SGLang's own method may run collectives on some ranks only
    finally:
        sglang_plugin.stop()


def test_once_its_bound_ran_out_a_request_the_prefill_did_not_take_is_not_deferred_again(service, monkeypatch):
    """A full batch can pass over the request when its bound runs out; a fresh bound next time would let it wait
    past ``defer_prefill_ms`` while ready requests behind it go first."""
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(sglang_plugin.time, "monotonic", lambda: clock.now)
    service.tower.gate.clear()
    service.on_arrival("slow", [item(12)])
    scheduler = _scheduler([_req("slow")])
    seen: list = []
    sglang_plugin._around_get_new_batch_prefill(lambda scheduler, running: None, scheduler, _running(1))
    clock.now += 0.5  # the bound runs out; this prefill has no room for it
    sglang_plugin._around_get_new_batch_prefill(lambda scheduler, running: None, scheduler, _running(1))
    clock.now += 0.01
    sglang_plugin._around_get_new_batch_prefill(_prefill_admitting_everything(seen), scheduler, _running(1))
    assert seen == [["slow"]]
