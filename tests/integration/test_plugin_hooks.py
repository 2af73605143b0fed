"""The scheduler hooks of the plugin, called as SGLang 0.5.23 calls them, around a service with a CPU tower.

Requests are SGLang's real ``Req`` / ``MultimodalInputs`` / ``MultimodalDataItem``; the prefix cache is
SGLang's real ``RadixCache`` (``create_simulated``: no memory pools). A Scheduler itself cannot be built
without a GPU model runner, so the hooks get a namespace with the attributes they read.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch
from mm_scheduler_sglang import settings, sglang_plugin
from mm_scheduler_sglang.service import EncoderService
from test_service import ROWS, SumTower

from mm_scheduler import CoalescerConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def service(monkeypatch):
    svc = EncoderService(SumTower(), CoalescerConfig(budget_bytes=1 << 20, bytes_per_patch=64), lockstep=False).start()
    monkeypatch.setattr(sglang_plugin, "_service", svc)
    yield svc
    svc.tower.gate.set()
    svc.close()


def _item(hash_value: int, start: int, end: int):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    return MultimodalDataItem(modality=Modality.IMAGE, hash=hash_value, offsets=[(start, end)],
                              feature=torch.full((ROWS, 3), float(hash_value)))


def _req(rid: str, items: list, length: int = 32):
    from sglang.srt.managers.schedule_batch import MultimodalInputs, Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid, "", array("i", range(length)), SamplingParams(max_new_tokens=4))
    req.multimodal_inputs = MultimodalInputs(mm_items=items)
    return req


def _scheduler_with_cached_prefix(tokens: int):
    """A scheduler whose radix cache holds the first ``tokens`` prompt tokens of every ``_req`` prompt."""
    from sglang.srt.disaggregation.utils import DisaggregationMode
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    cache = RadixCache.create_simulated()
    if tokens:
        cache.insert(InsertParams(key=RadixKey(token_ids=array("q", range(tokens)), extra_key=None)))
    return SimpleNamespace(tree_cache=cache, disable_radix_cache=False, disaggregation_mode=DisaggregationMode.NULL)


def _arrive(scheduler, req) -> None:
    sglang_plugin._around_add_request_to_queue(lambda *args, **kwargs: None, scheduler, req)


def test_cached_prefix_length_is_matched_in_sglangs_radix_cache():
    assert sglang_plugin.cached_prefix_len(_scheduler_with_cached_prefix(9), _req("r", [])) == 9
    assert sglang_plugin.cached_prefix_len(_scheduler_with_cached_prefix(0), _req("r", [])) == 0
    disabled = _scheduler_with_cached_prefix(9)
    disabled.disable_radix_cache = True
    assert sglang_plugin.cached_prefix_len(disabled, _req("r", [])) == 0
    assert sglang_plugin.cached_prefix_len(SimpleNamespace(tree_cache=None), _req("r", [])) == 0
    broken = SimpleNamespace(tree_cache=object(), disable_radix_cache=False)  # a cache the plugin cannot read
    assert sglang_plugin.cached_prefix_len(broken, _req("r", [])) == 0


def test_an_item_whose_last_token_is_not_cached_is_encoded_at_arrival(service, monkeypatch):
    """Tokens 0..8 are cached: an item ending at token 8 is served from the cache (skipped), one ending at
    token 9 is not (its last token must still be embedded), nor one entirely after the prefix."""
    monkeypatch.setattr(sglang_plugin, "_embedding_cache", lambda: None)
    scheduler = _scheduler_with_cached_prefix(9)
    cached, last_token_uncached, after = _item(1, 2, 8), _item(2, 4, 9), _item(3, 12, 15)
    req = _req("r", [cached, last_token_uncached, after])
    assert sglang_plugin.items_to_encode_early(scheduler, req) == [last_token_uncached, after]
    _arrive(scheduler, req)
    assert service.held_keys() == {("image", 2), ("image", 3)} and service.counts["submitted"] == 2


def test_items_in_sglangs_embedding_cache_are_not_encoded_at_arrival(service, monkeypatch):
    monkeypatch.setattr(sglang_plugin, "_embedding_cache", lambda: SimpleNamespace(has=lambda h: h == 2))
    scheduler = _scheduler_with_cached_prefix(0)
    items = [_item(1, 0, 3), _item(2, 4, 7)]
    assert sglang_plugin.items_to_encode_early(scheduler, _req("r", items)) == [items[0]]


def test_clearing_a_batchs_mm_inputs_releases_finished_requests_only(service):
    """``Scheduler._maybe_clear_mm_inputs`` runs over every request of a batch, finished or not: only the
    finished ones give up their results (a running request still needs its later chunks' results)."""
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH

    scheduler = _scheduler_with_cached_prefix(0)
    finished, running = _req("finished", [_item(1, 0, 3)]), _req("running", [_item(2, 0, 3)])
    _arrive(scheduler, finished)
    _arrive(scheduler, running)
    finished.finished_reason = FINISH_LENGTH(length=4)
    assert finished.finished() and not running.finished()
    sglang_plugin._before_clear_mm_inputs(scheduler, SimpleNamespace(reqs=[finished, running]))
    assert service.held_keys() == {("image", 2)}
    assert service.counts["released"] == 1


def test_release_hooks_drop_the_requests_holds(service):
    scheduler = _scheduler_with_cached_prefix(0)
    aborted, done = _req("aborted", [_item(1, 0, 3)]), _req("done", [_item(2, 0, 3)])
    _arrive(scheduler, aborted)
    _arrive(scheduler, done)
    sglang_plugin._before_release_on_abort(aborted)  # before Req.release_mm_inputs_on_abort
    assert service.held_keys() == {("image", 2)}
    sglang_plugin._before_release_features(done.multimodal_inputs)  # before MultimodalInputs.release_features
    assert service.held_keys() == set()


def test_the_sweep_runs_about_once_a_second_over_every_live_request(service, monkeypatch):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(sglang_plugin.time, "monotonic", lambda: clock.now)
    monkeypatch.setattr(sglang_plugin, "_last_sweep", 0.0)
    scheduler = _scheduler_with_cached_prefix(0)
    live, gone = _req("live", [_item(1, 0, 3)]), _req("gone", [_item(2, 0, 3)])
    _arrive(scheduler, live)
    _arrive(scheduler, gone)
    scheduler.waiting_queue = [live]
    for _ in range(2):  # two sweeps running
        sglang_plugin._after_get_next_batch(None, scheduler)
        assert service.held_keys() == {("image", 1), ("image", 2)} or _ == 1
        clock.now += sglang_plugin.SWEEP_INTERVAL_S * 0.99
        sglang_plugin._after_get_next_batch(None, scheduler)  # within the interval: no sweep
        clock.now += sglang_plugin.SWEEP_INTERVAL_S * 0.02
    assert service.held_keys() == {("image", 1)} and service.counts["swept"] == 1


def test_memory_release_drops_every_held_result(service):
    scheduler = _scheduler_with_cached_prefix(0)
    _arrive(scheduler, _req("a", [_item(1, 0, 3)]))
    sglang_plugin._before_release_memory(object())
    assert service.held_keys() == set() and service.held_bytes == 0


def test_prefill_chunks_consume_only_items_they_passed(service):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    scheduler = _scheduler_with_cached_prefix(0)
    req = _req("r", [_item(1, 0, 3), _item(2, 4, 7)])
    _arrive(scheduler, req)
    req.extend_end = 4  # tokens 0..3 prefilled
    sglang_plugin._after_run_batch(None, scheduler, SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=[req]))
    assert service.held_keys() == {("image", 1), ("image", 2)}  # a decode batch consumes nothing
    sglang_plugin._after_run_batch(None, scheduler, SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[req]))
    assert service.held_keys() == {("image", 2)}


def test_hooks_are_inert_without_a_service(monkeypatch):
    monkeypatch.setattr(sglang_plugin, "_service", None)
    req = _req("r", [_item(1, 0, 3)])
    scheduler = _scheduler_with_cached_prefix(0)
    assert sglang_plugin._around_add_request_to_queue(lambda *a, **k: "queued", scheduler, req) == "queued"
    sglang_plugin._before_clear_mm_inputs(scheduler, SimpleNamespace(reqs=[req]))
    sglang_plugin._before_release_on_abort(req)
    sglang_plugin._before_release_memory(object())
    assert sglang_plugin._around_get_feature(lambda model, items: ("own", items), object(), [1]) == ("own", [1])


def test_the_settings_default_to_a_two_second_prefill_wait_and_high_llm_stream_priority():
    assert settings.PLUGIN_DEFAULTS == {"llm_stream_priority": "high", "prefill_wait_ms": 2000.0,
                                        "defer_prefill_ms": 0.0}
