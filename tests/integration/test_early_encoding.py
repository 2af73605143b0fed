"""Early encoding: items are submitted when a request arrives, taken by hash at prefill, freed after.

Requests are SGLang's real ``Req`` / ``MultimodalInputs`` / ``MultimodalDataItem``; release goes
through their real (hooked) ``release_features`` / ``release_mm_inputs_on_abort``; prefill goes
through SGLang's real ``embed_mm_inputs``. The arrival hook is called as SGLang calls it, with a
no-op in place of the queue insertion (a Scheduler cannot be built without a GPU model runner).
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from types import SimpleNamespace

import pytest
import sglang_models as sm
import torch
from mm_scheduler_sglang import settings, sglang_compat, sglang_plugin
from test_equivalence import ATOL, RTOL, _embed, _request_lengths


@pytest.fixture(scope="module")
def model():
    from sglang.srt.plugins.hook_registry import HookRegistry

    sglang_plugin.register()
    HookRegistry.apply_hooks()
    return sm.qwen2_5_vl()


class ForwardLog:
    """Wraps the service's tower: records the keys of every unit it runs; can hold forwards at a gate."""

    def __init__(self, tower) -> None:
        self.keys: list = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self._forward = tower.forward
        tower.forward = self

    def __call__(self, units):
        self.started.set()
        assert self.gate.wait(30), "test gate never opened"
        self.keys.extend(u.key for u in units)
        return self._forward(units)

    def wait_for(self, count: int) -> None:
        _eventually(lambda: len(self.keys) >= count, f"{count} units to run")


def _eventually(condition, what: str, timeout: float = 30.0) -> None:
    """Handoffs to the coalescer's loop thread are asynchronous: poll, with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _start(model, mode="async", plugin=None, **values):
    service = sglang_plugin.start(model, {"config_path": None, "mode": mode, "values": values,
                                          "plugin": {**settings.PLUGIN_DEFAULTS, **(plugin or {})}}, tp_size=1)
    return service, ForwardLog(service.tower)


@pytest.fixture
def stop_service():
    yield
    sglang_plugin.stop()


def _request(rid: str, items: list):
    from sglang.srt.managers.schedule_batch import MultimodalInputs, Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid, "", array("i", [1, 2, 3]), SamplingParams(max_new_tokens=4))
    req.multimodal_inputs = MultimodalInputs(mm_items=items)
    return req


def _arrive(req) -> None:
    """What ``Scheduler._add_request_to_queue`` does once hooked, minus the queue insertion itself."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    scheduler = SimpleNamespace(disaggregation_mode=DisaggregationMode.NULL)
    sglang_plugin._around_add_request_to_queue(lambda *args, **kwargs: None, scheduler, req)


def _clone(item):
    """Another request's copy of the same image: a distinct item object with the same content hash."""
    twin = sm.make_item("image", item.feature.clone(), 0, image_grid_thw=item.image_grid_thw.clone())
    sm.set_hash(twin, item.hash)
    return twin


def test_request_encoded_at_arrival_is_taken_at_prefill_and_freed_at_finish(model, stop_service):
    items = [sm.qwen_image(model, 4, 4, 11), sm.qwen_image(model, 8, 4, 12)]
    requests = [(items, 3)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model)
    req = _request("a", items)
    _arrive(req)
    log.wait_for(2)  # encoded before any prefill asked for it
    got = _embed(model, requests, full)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert len(log.keys) == 2 and service.counts["taken_early"] == 2 and service.counts["encoded_on_demand"] == 0
    assert len(service.held_keys()) == 2
    req.multimodal_inputs.release_features()  # SGLang's finish path
    assert service.held_keys() == set()


needs_abort_hook = pytest.mark.skipif(
    not sglang_compat.current().has("abort_release"),
    reason="this SGLang has no Req.release_mm_inputs_on_abort (the sweep releases aborted requests: "
           "test_an_aborted_request_is_released_by_the_sweep)")


@needs_abort_hook
def test_abort_withdraws_queued_units_before_they_run(model, stop_service):
    service, log = _start(model)
    log.gate.clear()
    running = _request("running", [sm.qwen_image(model, 4, 4, 21)])
    _arrive(running)
    assert log.started.wait(30)  # while a forward runs, the coalescer queues new units
    aborted = _request("aborted", [sm.qwen_image(model, 8, 8, 22), sm.qwen_image(model, 4, 8, 23)])
    _arrive(aborted)
    _eventually(lambda: service.stats()["pending_units"] == 2, "both units of the second request to queue")
    aborted.release_mm_inputs_on_abort()  # SGLang's abort path
    _eventually(lambda: service.stats()["pending_units"] == 0, "the aborted units to be withdrawn")
    log.gate.set()
    log.wait_for(1)
    # A later arrival is a barrier: units leave the (single, ragged) bucket in arrival order, so a
    # withdrawn unit still queued would run before or with it.
    sentinel = _request("sentinel", [sm.qwen_image(model, 4, 4, 24)])
    _arrive(sentinel)
    log.wait_for(2)
    ran = [(service.tower.result_key(req.multimodal_inputs.mm_items[0]), 0) for req in (running, sentinel)]
    assert log.keys == ran
    assert service.counts["cancelled"] == 2 and len(service.held_keys()) == 2, service.stats()


def test_two_requests_with_the_same_image_hash_encode_once(model, stop_service):
    shared = sm.qwen_image(model, 4, 4, 31)
    first = _request("first", [shared])
    second = _request("second", [_clone(shared), sm.qwen_image(model, 4, 6, 32)])
    requests = [(second.multimodal_inputs.mm_items, 2)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model)
    _arrive(first)
    _arrive(second)
    log.wait_for(2)
    got = _embed(model, requests, full)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    tower = service.tower
    shared_key = tower.result_key(shared)
    assert len(log.keys) == 2
    assert set(log.keys) == {(shared_key, 0), (tower.result_key(second.multimodal_inputs.mm_items[1]), 0)}
    assert service.counts["shared"] == 1 and service.counts["taken_early"] == 2
    first.multimodal_inputs.release_features()
    assert shared_key in service.held_keys()  # the second request still holds it
    second.multimodal_inputs.release_features()
    assert service.held_keys() == set()


def test_chunked_prefill_takes_held_results_in_every_chunk(model, stop_service):
    items = [sm.qwen_image(model, 4, 4, 41), sm.qwen_image(model, 8, 4, 42)]
    requests = [(items, 3)]
    (length,) = _request_lengths(model, requests)
    expected = _embed(model, requests, [(0, length)])
    service, log = _start(model)
    _arrive(_request("chunked", items))
    split = 3 + 4 + 1 + 3  # text, first image, separator, then 3 of the second image's 8 tokens
    chunks = [_embed(model, requests, [(0, split)]), _embed(model, requests, [(split, length - split)])]
    torch.testing.assert_close(torch.cat(chunks), expected, atol=ATOL, rtol=RTOL)
    assert len(log.keys) == 2  # the second image served both chunks from one encode
    assert service.counts["taken_early"] == 3


def test_lockstep_service_encodes_everything_queued_at_the_first_prefill(model, stop_service):
    service, log = _start(model, mode="lockstep")
    early = _request("early", [sm.qwen_image(model, 4, 4, 51)])
    later = _request("later", [sm.qwen_image(model, 4, 6, 52), sm.qwen_image(model, 8, 4, 53)])
    _arrive(early)
    _arrive(later)
    assert log.keys == []  # lockstep never encodes behind the scheduler's back
    requests = [(early.multimodal_inputs.mm_items, 1)]
    _embed(model, requests, [(0, n) for n in _request_lengths(model, requests)])
    assert service.stats()["forwards"] == 1 and len(log.keys) == 3
    requests = [(later.multimodal_inputs.mm_items, 1)]
    _embed(model, requests, [(0, n) for n in _request_lengths(model, requests)])
    assert service.stats()["forwards"] == 1 and service.counts["taken_early"] == 3


def test_unsupported_model_is_left_untouched_with_a_log_line(caplog):
    caplog.set_level("INFO", logger="mm_scheduler_sglang.sglang_plugin")
    assert sglang_plugin.start(torch.nn.Linear(2, 2), {"config_path": None, "mode": "auto", "values": {}},
                               tp_size=1) is None
    assert sglang_plugin.active_service() is None
    assert "plugin off for this model" in caplog.text


def test_items_the_tower_does_not_take_go_to_sglangs_own_method(model, stop_service):
    """Qwen2.5-VL's own method passes already-embedded features through; the plugin must not touch them."""
    service, log = _start(model)
    embedded = sm.make_item("image", torch.randn(4, 64), 61, image_grid_thw=torch.tensor([[1, 4, 4]]))
    _arrive(_request("embedded", [embedded]))
    got = model.get_image_feature([embedded])
    assert torch.equal(got, embedded.feature)  # SGLang's own pass-through (cat + dtype cast copies)
    assert service.counts["fallbacks"] == 1 and service.counts["submitted"] == 0 and log.keys == []


def test_a_call_handed_to_sglangs_method_gets_its_features_on_the_towers_device_when_they_were_on_two(
        model, stop_service, monkeypatch):
    """SGLang 0.5.16's Qwen3-VL method concatenated features as it found them; with cuda_ipc transport a batch
    held GPU and CPU features and the scheduler died (real server, e12f02a). The plugin moves them first, as
    later SGLang does. A CPU machine has one real device, so the meta device stands in for the GPU here."""
    service, log = _start(model)
    monkeypatch.setattr(service.tower, "device", torch.device("meta"))
    on_gpu = sm.make_item("image", torch.randn(4, 64, device="meta"), 63, image_grid_thw=torch.tensor([[1, 4, 4]]))
    on_cpu = sm.make_item("image", torch.randn(4, 64), 64, image_grid_thw=torch.tensor([[1, 4, 4]]))
    with pytest.raises(RuntimeError, match="device"):  # what SGLang's own method does with them as they are
        torch.cat([on_gpu.feature, on_cpu.feature])
    _arrive(_request("two-devices", [on_gpu, on_cpu]))
    got = model.get_image_feature([on_gpu, on_cpu])
    assert got.device.type == "meta" and got.shape == (8, 64)
    assert on_cpu.feature.device.type == "meta" and service.counts["fallbacks"] == 1 and log.keys == []


def test_arrival_hook_skips_retracted_decode_side_and_rejected_requests(model, stop_service):
    from sglang.srt.disaggregation.utils import DisaggregationMode

    service, _ = _start(model)
    normal = SimpleNamespace(disaggregation_mode=DisaggregationMode.NULL)
    decode = SimpleNamespace(disaggregation_mode=DisaggregationMode.DECODE)
    queue = lambda *args, **kwargs: None  # noqa: E731 - the queue insertion SGLang would do
    sglang_plugin._around_add_request_to_queue(queue, normal, _request("retracted", [sm.qwen_image(model, 4, 4, 71)]),
                                               is_retracted=True)
    sglang_plugin._around_add_request_to_queue(queue, decode, _request("decode", [sm.qwen_image(model, 4, 4, 72)]))
    rejected = _request("rejected", [sm.qwen_image(model, 4, 4, 73)])
    # What SGLang's queue insertion does to a request it rejects (priority / queue limit): 0.5.22+ release
    # its media, earlier releases mark it finished with an abort.
    reject = (rejected.release_mm_inputs_on_abort if sglang_compat.current().has("abort_release")
              else lambda: rejected.set_finish_with_abort("rejected"))
    sglang_plugin._around_add_request_to_queue(lambda *a, **k: reject(), normal, rejected)
    assert service.counts["submitted"] == 0 and service.held_keys() == set()
    sglang_plugin._around_add_request_to_queue(queue, normal, _request("ok", [sm.qwen_image(model, 4, 4, 74)]))
    assert service.counts["submitted"] == 1


def test_with_early_encode_min_waiting_only_requests_behind_a_queue_are_encoded_at_arrival(model, stop_service):
    alone, queued = [sm.qwen_image(model, 4, 4, 83)], [sm.qwen_image(model, 8, 4, 84)]
    requests = [(alone, 3), (queued, 3)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model, plugin={"early_encode_min_waiting": 1})
    scheduler = _scheduler()
    sglang_plugin._around_add_request_to_queue(_enqueue, scheduler, _request("alone", alone))
    assert service.counts["submitted"] == 0  # nothing waits ahead: its prefill comes next
    sglang_plugin._around_add_request_to_queue(_enqueue, scheduler, _request("queued", queued))
    assert service.counts["submitted"] == 1  # one request waits ahead of it
    log.wait_for(1)
    got = _embed(model, requests, full)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert service.counts["taken_early"] == 1 and service.counts["encoded_on_demand"] == 1
    assert service.counts["fallbacks"] == 0


def test_with_early_encode_min_waiting_a_lone_prefill_on_an_idle_coalescer_runs_sglangs_own_method(model,
                                                                                                   stop_service):
    """Nothing to batch with and nothing in flight: the hop to the coalescer would only add to the prefill's wait."""
    alone = [sm.qwen_image(model, 4, 4, 92)]
    requests = [(alone, 3)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model, plugin={"early_encode_min_waiting": 1})
    assert service.inline_when_idle
    sglang_plugin._around_add_request_to_queue(_enqueue, _scheduler(), _request("alone", alone))
    torch.testing.assert_close(_embed(model, requests, full), expected, atol=ATOL, rtol=RTOL)
    assert service.counts["inline"] == 1 and log.keys == []  # the coalescer ran nothing
    assert service.counts["encoded_on_demand"] == 0 and service.counts["fallbacks"] == 0


class GraphsThatRecord:
    """In place of the captured ``QwenVisionGraphs`` (CUDA only): ``run`` records the call and then computes what a
    replay returns (the tower's forward of the packed batch), returns None (no bucket holds it) or raises."""

    def __init__(self, visual, outcome: str = "replays") -> None:
        self.visual, self.outcome, self.calls = visual, outcome, []

    def run(self, pixels, grids):
        self.calls.append((pixels.shape[0], grids.tolist()))
        if self.outcome == "raises":
            raise RuntimeError("replay failed")
        return self.visual(pixels, grid_thw=grids) if self.outcome == "replays" else None


@pytest.mark.parametrize("outcome", ["replays", "declines", "raises"])
def test_an_inline_prefill_of_images_is_offered_to_the_captured_graphs_in_one_packed_call(model, stop_service,
                                                                                          outcome):
    """With graphs, the idle path replays them on the scheduler's stream (faster than SGLang's own call):
    both images in one call, in item order. When no bucket holds them, or the replay fails, SGLang's own method
    runs instead and the prefill gets the same embedding."""
    alone = [sm.qwen_image(model, 4, 4, 97), sm.qwen_image(model, 8, 4, 98)]
    requests = [(alone, 3)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model, plugin={"early_encode_min_waiting": 1})
    service.tower.graphs = graphs = GraphsThatRecord(model.visual, outcome)
    own_calls = []
    original = service.tower.__class__.encode_now

    def counting(tower, items, method):
        return original(tower, items, lambda its: own_calls.append(len(its)) or method(its))

    service.tower.encode_now = counting.__get__(service.tower)
    torch.testing.assert_close(_embed(model, requests, full), expected, atol=ATOL, rtol=RTOL)
    assert graphs.calls == [(16 + 32, [[1, 4, 4], [1, 8, 4]])]
    assert own_calls == ([] if outcome == "replays" else [2])
    assert service.counts["inline"] == 1 and service.counts["fallbacks"] == 0 and log.keys == []


def test_an_inline_prefill_of_a_video_runs_sglangs_own_method_even_with_graphs(model, stop_service):
    """Graphs are offered images only (a clip's frames are not captured as one segment layout)."""
    alone = [sm.qwen_video(model, 2, 4, 4, 99)]
    requests = [(alone, 3)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model, plugin={"early_encode_min_waiting": 1})
    service.tower.graphs = graphs = GraphsThatRecord(model.visual)
    torch.testing.assert_close(_embed(model, requests, full), expected, atol=ATOL, rtol=RTOL)
    assert graphs.calls == [] and service.counts["inline"] == 1 and log.keys == []


def test_with_early_encode_min_waiting_a_prefill_goes_through_a_busy_coalescer(model, stop_service):
    """A forward in flight (another request's early encode): the prefill's items queue behind it, urgently,
    instead of running SGLang's method beside it on the same tower."""
    busy, alone = [sm.qwen_image(model, 8, 4, 93)], [sm.qwen_image(model, 4, 4, 94)]
    requests = [(alone, 3)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model, plugin={"early_encode_min_waiting": 1})
    log.gate.clear()
    scheduler = _scheduler()
    scheduler.waiting_queue.append(_request("ahead", []))
    sglang_plugin._around_add_request_to_queue(_enqueue, scheduler, _request("busy", busy))  # one ahead: early
    assert log.started.wait(30)  # its forward is in flight, held at the gate
    threading.Timer(0.2, log.gate.set).start()
    torch.testing.assert_close(_embed(model, requests, full), expected, atol=ATOL, rtol=RTOL)
    assert service.counts["inline"] == 0 and service.counts["encoded_on_demand"] == 1
    assert len(log.keys) == 2  # the busy request's unit, then the prefill's


def test_with_early_encode_min_waiting_queued_units_make_the_coalescer_busy_too(model, stop_service, monkeypatch):
    """Units queued but not yet dispatched (no forward in flight yet) are work the prefill's items can join."""
    alone = [sm.qwen_image(model, 4, 4, 95)]
    requests = [(alone, 3)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model, plugin={"early_encode_min_waiting": 1})
    stats = service._coalescer.stats
    monkeypatch.setattr(service._coalescer, "stats", lambda: {**stats(), "pending_units": 1, "inflight_batches": 0})
    torch.testing.assert_close(_embed(model, requests, full), expected, atol=ATOL, rtol=RTOL)
    assert service.counts["inline"] == 0 and service.counts["encoded_on_demand"] == 1 and len(log.keys) == 1


def test_without_the_gate_a_prefill_on_an_idle_coalescer_still_goes_through_it(model, stop_service):
    alone = [sm.qwen_image(model, 4, 4, 96)]  # never arrived: nothing held, the coalescer idle
    requests = [(alone, 3)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model)
    torch.testing.assert_close(_embed(model, requests, full), expected, atol=ATOL, rtol=RTOL)
    assert service.counts["inline"] == 0 and service.counts["encoded_on_demand"] == 1 and len(log.keys) == 1


def _scheduler(mode: str = "NULL", chunked=None) -> SimpleNamespace:
    from sglang.srt.disaggregation.utils import DisaggregationMode

    return SimpleNamespace(disaggregation_mode=DisaggregationMode[mode], waiting_queue=[], chunked_req=chunked)


def _enqueue(scheduler, req, *args, **kwargs):
    """SGLang's insertion of an admitted request (unified server)."""
    scheduler.waiting_queue.append(req)


def test_a_request_left_to_its_prefill_is_encoded_once_a_prefill_batch_passes_it_over(model, stop_service):
    service, log = _start(model, plugin={"early_encode_min_waiting": 1})
    scheduler = _scheduler()
    taken = _request("taken", [sm.qwen_image(model, 4, 4, 85)])
    sglang_plugin._around_add_request_to_queue(_enqueue, scheduler, taken)
    assert service.counts["submitted"] == 0

    def prefill_takes_all(scheduler, running_batch):
        scheduler.waiting_queue.clear()

    sglang_plugin._around_get_new_batch_prefill(prefill_takes_all, scheduler, None)
    assert service.counts["submitted"] == 0  # prefilled at once: its prefill encodes it
    over = _request("over", [sm.qwen_image(model, 4, 4, 86)])
    sglang_plugin._around_add_request_to_queue(_enqueue, scheduler, over)  # nothing ahead: left to its prefill
    early = _request("early", [sm.qwen_image(model, 4, 4, 90)])
    sglang_plugin._around_add_request_to_queue(_enqueue, scheduler, early)  # one ahead: encoded at arrival
    assert service.counts["submitted"] == 1
    gone = _request("gone", [sm.qwen_image(model, 4, 4, 91)])
    scheduler.waiting_queue.clear()
    sglang_plugin._around_add_request_to_queue(_enqueue, scheduler, gone)  # left to its prefill, then aborted
    gone.set_finish_with_abort("client went away")
    scheduler.waiting_queue = [over, early, gone]
    sglang_plugin._around_get_new_batch_prefill(lambda scheduler, running_batch: None, scheduler, None)  # batch full
    assert service.counts["submitted"] == 2  # "over" waits after all: encoded now; "early" not again, "gone" never
    assert service.counts["shared"] == 0
    log.wait_for(2)
    sglang_plugin._around_get_new_batch_prefill(lambda scheduler, running_batch: None, scheduler, None)
    assert service.counts["submitted"] == 2  # once
    over.multimodal_inputs.release_features()  # its holds are its own: SGLang's finish path frees them
    early.multimodal_inputs.release_features()
    assert service.held_keys() == set()


def test_a_chunked_prefill_in_progress_counts_as_a_request_ahead(model, stop_service):
    service, _ = _start(model, plugin={"early_encode_min_waiting": 1})
    scheduler = _scheduler(chunked=object())
    behind = _request("behind", [sm.qwen_image(model, 4, 4, 87)])
    sglang_plugin._around_add_request_to_queue(_enqueue, scheduler, behind)
    assert service.counts["submitted"] == 1


def test_a_pd_prefill_server_encodes_every_arrival_whatever_the_gate(model, stop_service):
    service, _ = _start(model, plugin={"early_encode_min_waiting": 3})
    scheduler = _scheduler("PREFILL")
    sglang_plugin._around_add_request_to_queue(lambda *a, **k: None, scheduler,  # into the bootstrap queue
                                               _request("pd", [sm.qwen_image(model, 4, 4, 88)]))
    assert service.counts["submitted"] == 1


def test_a_request_sglang_refuses_at_its_queue_limit_is_not_encoded(model, stop_service):
    service, _ = _start(model)
    scheduler = _scheduler()
    scheduler.waiting_queue.append(_request("already-waiting", []))
    sglang_plugin._around_add_request_to_queue(lambda *a, **k: None, scheduler,  # refused: not appended
                                               _request("refused", [sm.qwen_image(model, 4, 4, 89)]))
    assert service.counts["submitted"] == 0 and service.held_keys() == set()


def test_arrivals_beyond_the_held_results_cap_are_encoded_at_prefill(model, stop_service):
    first = _request("first", [sm.qwen_image(model, 4, 4, 81)])
    second = _request("second", [sm.qwen_image(model, 8, 4, 82)])
    requests = [(second.multimodal_inputs.mm_items, 2)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    cap = 4 * 64 * 4  # exactly the first image's embedding: 4 tokens x 64 floats
    service = sglang_plugin.start(model, {"config_path": None, "mode": "async", "values": {},
                                          "max_held_bytes": cap}, tp_size=1)
    _arrive(first)
    _arrive(second)
    assert service.counts["submitted"] == 1 and service.counts["deferred"] == 1 and service.held_bytes == cap
    torch.testing.assert_close(_embed(model, requests, full), expected, atol=ATOL, rtol=RTOL)
    assert service.counts["encoded_on_demand"] == 1
    first.multimodal_inputs.release_features()
    assert service.held_bytes == 0


def test_an_arrival_refused_by_a_full_queue_is_encoded_at_its_prefill_with_one_line_and_no_traceback(
        model, stop_service, caplog):
    """A burst beyond ``max_queue_patches`` (seen in the real server once the tokenizer manager sped up: 90 of a
    Gemma 4 seed burst's 600 images) is the configured backpressure, not a fault."""
    first = _request("first", [sm.qwen_image(model, 4, 4, 91)])  # 16 patches, held in its forward by the gate
    second = _request("second", [sm.qwen_image(model, 4, 4, 92)])  # 16 patches, queued behind it
    third = _request("third", [sm.qwen_image(model, 8, 4, 93)])  # 32 patches: 48 queued would exceed 40
    requests = [(third.multimodal_inputs.mm_items, 2)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service, log = _start(model, max_queue_patches=40, max_inflight_batches=1)
    log.gate.clear()
    _arrive(first)
    assert log.started.wait(30)
    _arrive(second)
    caplog.set_level(logging.INFO, logger="mm_scheduler_sglang")
    _arrive(third)
    log.gate.set()
    log.wait_for(2)  # the queue has drained: the prefill's own encode fits
    torch.testing.assert_close(_embed(model, requests, full), expected, atol=ATOL, rtol=RTOL)
    assert service.counts["encoded_on_demand"] == 1 and service.counts["fallbacks"] == 0
    refused = [r for r in caplog.records if "was refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.INFO and refused[0].exc_info is None
    assert "max_queue_patches is 40" in refused[0].getMessage()
    assert "failed or was withdrawn" not in caplog.text


def _launched(req, extend_end: int) -> None:
    """What the hooked ``Scheduler.run_batch`` sees after launching a prefill chunk of ``req``."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    if sglang_compat.current().form("extend_end").how == "Req.extend_end":
        req.extend_end = extend_end
    else:  # before 0.5.22: this round's [start, end) of the fill ids
        from sglang.srt.utils.common import Range

        req.extend_range = Range(0, extend_end)
    sglang_plugin._after_run_batch(None, None, SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[req]))


def test_results_are_freed_once_prefill_has_passed_their_tokens(model, stop_service):
    items = [sm.qwen_image(model, 4, 4, 91), sm.qwen_image(model, 8, 4, 92)]
    req = _request("chunked", items)
    requests = [(items, 3)]
    (length,) = _request_lengths(model, requests)
    service, log = _start(model)
    _arrive(req)
    split = 3 + 4 + 1 + 3  # the first chunk ends inside the second image
    _embed(model, requests, [(0, split)])
    _launched(req, split)
    assert service.held_keys() == {service.tower.result_key(items[1])}  # the first image is done with
    _embed(model, requests, [(split, length - split)])
    _launched(req, length)
    assert service.held_keys() == set() and service.held_bytes == 0
    assert len(log.keys) == 2 and service.counts["taken_early"] == 3 and not req.finished()
    req.multimodal_inputs.release_features()  # the later finish finds nothing left to free
    assert service.counts["released"] == 2


def test_an_aborted_request_is_released_by_the_sweep(model, stop_service):
    """Every release: an aborted request SGLang no longer holds anywhere is released by the sweep (the only
    abort release before 0.5.22, which lacks ``Req.release_mm_inputs_on_abort``)."""
    from sglang.srt.disaggregation.utils import DisaggregationMode

    service, log = _start(model)
    req = _request("aborted", [sm.qwen_image(model, 4, 4, 101)])
    _arrive(req)
    log.wait_for(1)
    assert len(service.held_keys()) == 1
    req.set_finish_with_abort("client went away")  # what SGLang does on abort (0.5.22+ also calls the hook)
    scheduler = SimpleNamespace(disaggregation_mode=DisaggregationMode.NULL, waiting_queue=[])
    sglang_plugin._last_sweep = 0.0
    sglang_plugin._after_get_next_batch(None, scheduler)  # first sweep: absent once
    sglang_plugin._last_sweep = 0.0
    sglang_plugin._after_get_next_batch(None, scheduler)  # second sweep running: released
    assert service.held_keys() == set() and service.held_bytes == 0
