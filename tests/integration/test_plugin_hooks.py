"""The scheduler hooks of the plugin, called as SGLang 0.5.23 calls them, around a service with a CPU tower.

Requests are SGLang's real ``Req`` / ``MultimodalInputs`` / ``MultimodalDataItem``; the prefix cache is
SGLang's real ``RadixCache`` (``create_simulated``: no memory pools). A Scheduler itself cannot be built
without a GPU model runner, so the hooks get a namespace with the attributes they read.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from mm_scheduler_sglang import settings, sglang_compat, sglang_plugin
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


def test_the_sweep_runs_once_a_second_over_every_live_request(service, monkeypatch):
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(sglang_plugin.time, "monotonic", lambda: clock.now)
    monkeypatch.setattr(sglang_plugin, "_last_sweep", 0.0)
    monkeypatch.setattr(sglang_plugin, "_deferred_since", {"gone": 1.0, "live": 1.0})
    scheduler = _scheduler_with_cached_prefix(0)
    live, gone = _req("live", [_item(1, 0, 3)]), _req("gone", [_item(2, 0, 3)])
    _arrive(scheduler, live)
    _arrive(scheduler, gone)
    scheduler.waiting_queue = [live]
    swept_at: list[float] = []
    real_sweep = service.sweep
    monkeypatch.setattr(service, "sweep", lambda rids: swept_at.append(clock.now) or real_sweep(rids))
    for step in (0.0, 0.5, 0.5, 0.75, 0.25):  # binary-exact: 100, 100.5, 101, 101.75, 102
        clock.now += step
        sglang_plugin._after_get_next_batch(None, scheduler)
    assert swept_at == [100.0, 101.0, 102.0]  # at most once per SWEEP_INTERVAL_S, and at exactly that interval
    assert service.held_keys() == {("image", 1)} and service.counts["swept"] == 1
    assert sglang_plugin._deferred_since == {"live": 1.0}  # the deferral clocks of gone requests go too


def test_memory_release_drops_every_held_result(service):
    scheduler = _scheduler_with_cached_prefix(0)
    _arrive(scheduler, _req("a", [_item(1, 0, 3)]))
    sglang_plugin._before_release_memory(object())
    assert service.held_keys() == set() and service.held_bytes == 0


def _extend_to(req, end: int) -> None:
    """Set where this round's extend ends, where the installed SGLang keeps it (the version layer reads it)."""
    if sglang_compat.current().form("extend_end").how == "Req.extend_end":
        req.extend_end = end
    else:
        req.extend_range = SimpleNamespace(end=end)


def test_prefill_chunks_consume_only_items_they_passed(service):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    scheduler = _scheduler_with_cached_prefix(0)
    req = _req("r", [_item(1, 0, 3), _item(2, 4, 7)])
    _arrive(scheduler, req)
    _extend_to(req, 4)  # tokens 0..3 prefilled
    sglang_plugin._after_run_batch(None, scheduler, SimpleNamespace(forward_mode=ForwardMode.DECODE, reqs=[req]))
    assert service.held_keys() == {("image", 1), ("image", 2)}  # a decode batch consumes nothing
    sglang_plugin._after_run_batch(None, scheduler, SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[req]))
    assert service.held_keys() == {("image", 2)}


def test_hooks_are_inert_without_a_service(monkeypatch):
    monkeypatch.setattr(sglang_plugin, "_service", None)
    req = _req("r", [_item(1, 0, 3)])
    setattr(req.multimodal_inputs, sglang_plugin._RID_ATTR, "r")
    scheduler = _scheduler_with_cached_prefix(0)
    assert sglang_plugin._around_add_request_to_queue(lambda *a, **k: "queued", scheduler, req) == "queued"
    sglang_plugin._before_clear_mm_inputs(scheduler, SimpleNamespace(reqs=[req]))
    sglang_plugin._before_release_on_abort(req)
    sglang_plugin._before_release_features(req.multimodal_inputs)
    sglang_plugin._before_release_memory(object())
    sglang_plugin._after_run_batch(None, scheduler, SimpleNamespace(forward_mode=None, reqs=[req]))
    sglang_plugin._after_get_next_batch(None, scheduler)
    assert sglang_plugin._around_get_feature(lambda model, items: ("own", items), object(), [1]) == ("own", [1])


def test_the_arrival_hook_passes_sglangs_own_call_through_unchanged(service):
    calls = []
    scheduler = _scheduler_with_cached_prefix(0)
    req = _req("r", [_item(1, 0, 3)])
    result = sglang_plugin._around_add_request_to_queue(
        lambda *args, **kwargs: calls.append((args, kwargs)) or "queued", scheduler, req, is_retracted=False)
    assert result == "queued" and calls == [((scheduler, req), {"is_retracted": False})]
    assert getattr(req.multimodal_inputs, sglang_plugin._RID_ATTR) == "r"  # for release_features' hook
    again = _req("again", [_item(2, 0, 3)])
    sglang_plugin._around_add_request_to_queue(lambda *args, **kwargs: calls.append((args, kwargs)), scheduler, again,
                                               True)  # is_retracted passed positionally
    assert calls[-1] == ((scheduler, again, True), {})
    assert service.held_keys() == {("image", 1)}


def test_a_text_only_request_in_a_prefill_batch_consumes_nothing(service):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    scheduler = _scheduler_with_cached_prefix(0)
    text = _req("text", [])
    text.multimodal_inputs, text.extend_end = None, 3
    mm = _req("mm", [_item(1, 0, 3)])
    _arrive(scheduler, mm)
    mm.extend_end = None  # not scheduled in this batch
    sglang_plugin._after_run_batch(None, scheduler, SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[text, mm]))
    assert service.held_keys() == {("image", 1)}


def test_the_embedding_cache_is_sglangs_module_level_cache(monkeypatch):
    module = sglang_compat.embedding_cache_module()  # managers.mm_schedule, or mm_utils before 0.5.18
    cache = object()
    monkeypatch.setattr(module, "embedding_cache", cache, raising=False)
    assert sglang_plugin._embedding_cache() is cache
    monkeypatch.delattr(module, "embedding_cache")
    assert sglang_plugin._embedding_cache() is None


def test_live_rids_skips_entries_without_a_request_id():
    scheduler = SimpleNamespace(waiting_queue=[SimpleNamespace(rid="w"), SimpleNamespace()])
    assert sglang_plugin.live_rids(scheduler) == {"w"}


# --- start-up hooks ---------------------------------------------------------------------------------
class _RecordingStreams:
    def __init__(self) -> None:
        self.enabled: list[bool] = []

    def __call__(self, enabled: bool):
        import contextlib

        self.enabled.append(enabled)
        return contextlib.nullcontext()


@pytest.mark.parametrize(("chosen", "high"), [
    (None, False),
    ({"plugin": {"llm_stream_priority": "high"}}, True),
    ({"plugin": {"llm_stream_priority": "default"}}, False),
    ({}, True),  # settings without a plugin section: the default, high
])
def test_sglangs_streams_are_created_at_high_priority_only_when_enabled_and_configured(monkeypatch, chosen, high):
    streams = _RecordingStreams()
    monkeypatch.setattr(sglang_plugin, "llm_streams_at_high_priority", streams)
    started = []
    monkeypatch.setattr(sglang_plugin, "_start_for_scheduler", lambda scheduler, c: started.append((scheduler, c)))
    built = []
    server_args = SimpleNamespace(**({} if chosen is None else {settings.ATTR: chosen}))
    scheduler = object()
    sglang_plugin._around_scheduler_init(lambda *args, **kwargs: built.append((args, kwargs)), scheduler,
                                         server_args, 7, flag=True)  # server_args positional, as SGLang passes it
    assert streams.enabled == [high]
    assert built == [((scheduler, server_args, 7), {"flag": True})]
    assert started == ([] if chosen is None else [(scheduler, chosen)])


def test_a_scheduler_without_a_model_runner_leaves_the_plugin_off_with_a_warning(monkeypatch, caplog):
    import logging

    from sglang.srt import runtime_context
    from sglang.srt.disaggregation.utils import DisaggregationMode

    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(pp_rank=0, tp_size=2))
    started = []
    monkeypatch.setattr(sglang_plugin, "start", lambda *args, **kwargs: started.append((args, kwargs)))
    with caplog.at_level(logging.WARNING, logger="mm_scheduler_sglang.sglang_plugin"):
        sglang_plugin._start_for_scheduler(SimpleNamespace(), {})
        sglang_plugin._start_for_scheduler(SimpleNamespace(tp_worker=SimpleNamespace()), {})
    assert started == [] and caplog.text.count("exposes no model_runner.model; plugin off") == 2
    model = object()
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)),
                                disaggregation_mode=DisaggregationMode.NULL)
    sglang_plugin._start_for_scheduler(scheduler, {"mode": "auto"})
    assert started == [((model, {"mode": "auto"}), {"tp_size": 2, "scheduler": scheduler, "widening": None})]
    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(pp_rank=1, tp_size=2))
    sglang_plugin._start_for_scheduler(scheduler, {"mode": "auto"})  # later pipeline stages hold no tower
    assert len(started) == 1


def test_a_pd_decode_server_leaves_the_plugin_off_and_a_pd_prefill_server_starts_it(monkeypatch, caplog):
    import logging

    from sglang.srt import runtime_context
    from sglang.srt.disaggregation.utils import DisaggregationMode

    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(pp_rank=0, tp_size=1))
    started = []
    monkeypatch.setattr(sglang_plugin, "start", lambda model, chosen, **kwargs: started.append(kwargs["scheduler"]))
    model_runner = SimpleNamespace(model=object())
    decode, prefill = (SimpleNamespace(tp_worker=SimpleNamespace(model_runner=model_runner), disaggregation_mode=mode)
                       for mode in (DisaggregationMode.DECODE, DisaggregationMode.PREFILL))
    with caplog.at_level(logging.INFO, logger="mm_scheduler_sglang.sglang_plugin"):
        sglang_plugin._start_for_scheduler(decode, {"mode": "auto"})
        sglang_plugin._start_for_scheduler(prefill, {"mode": "auto"})
    assert started == [prefill] and "PD decode server" in caplog.text


def test_engine_settings_come_from_the_environment_once_and_are_never_overwritten(monkeypatch, tmp_path):
    for name in (settings.ENV_ENABLE, settings.ENV_CONFIG, settings.ENV_MODE, settings.ENV_MAX_HELD_MB):
        monkeypatch.delenv(name, raising=False)
    plain = SimpleNamespace()
    sglang_plugin._after_resolve_once(None, plain)
    assert getattr(plain, settings.ATTR) is None  # not enabled: resolved, to nothing
    monkeypatch.setenv(settings.ENV_ENABLE, "1")
    enabled = SimpleNamespace()
    sglang_plugin._after_resolve_once(None, enabled)
    assert getattr(enabled, settings.ATTR)["mode"] == "auto"
    from_cli = SimpleNamespace(**{settings.ATTR: {"from": "cli"}})
    sglang_plugin._after_resolve_once(None, from_cli)
    assert getattr(from_cli, settings.ATTR) == {"from": "cli"}
    monkeypatch.setenv(settings.ENV_MODE, "bogus")
    with pytest.raises(SystemExit, match=r"^mm-coalescer: MM_COALESCER_MODE='bogus'"):
        sglang_plugin._after_resolve_once(None, SimpleNamespace())


def test_cli_settings_are_stored_on_server_args_and_a_bad_config_exits_naming_it(monkeypatch, tmp_path):
    for name in (settings.ENV_ENABLE, settings.ENV_CONFIG, settings.ENV_MODE, settings.ENV_MAX_HELD_MB):
        monkeypatch.delenv(name, raising=False)
    built = SimpleNamespace()
    args = SimpleNamespace(enable_mm_coalescer=True, mm_coalescer_config=None, mm_coalescer_max_held_mb=2.0)
    calls = []
    server_args_cls = type("ServerArgs", (), {})
    assert sglang_plugin._around_from_cli_args(lambda cls, a: calls.append((cls, a)) or built, server_args_cls,
                                               args) is built
    assert calls == [(server_args_cls, args)]
    assert getattr(built, settings.ATTR)["max_held_bytes"] == 2 * 2**20
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_key: 1\n")
    args = SimpleNamespace(enable_mm_coalescer=False, mm_coalescer_config=str(bad), mm_coalescer_max_held_mb=None)
    with pytest.raises(SystemExit, match=f"^mm-coalescer: .*{bad.name}.*no_such_key"):
        sglang_plugin._around_from_cli_args(lambda cls, a: SimpleNamespace(), object, args)
    off = SimpleNamespace()
    sglang_plugin._around_from_cli_args(lambda cls, a: off, object, SimpleNamespace())  # SGLang's own args only
    assert getattr(off, settings.ATTR) is None


def test_the_flags_join_sglangs_parser_through_the_hook():
    import argparse

    parser = argparse.ArgumentParser()
    sglang_plugin._after_add_cli_args(None, parser)
    assert parser.parse_args(["--enable-mm-coalescer"]).enable_mm_coalescer is True


def test_each_encoder_method_of_the_exact_model_class_is_hooked_once(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    registered, applied = [], []
    monkeypatch.setattr(HookRegistry, "register", lambda *args, **kwargs: registered.append((args, kwargs)))
    monkeypatch.setattr(HookRegistry, "apply_hooks", lambda: applied.append(True))
    monkeypatch.setattr(sglang_plugin, "_hooked_targets", set())
    model_cls = type("Gemma3ForConditionalGeneration", (), {"__module__": "sglang.srt.models.gemma3_mm"})
    for _ in range(2):  # a restarted service must not wrap the method twice
        sglang_plugin._hook_model_class(model_cls)
    target = "sglang.srt.models.gemma3_mm.Gemma3ForConditionalGeneration.get_image_feature"
    assert [args for args, _ in registered] == [(target, sglang_plugin._around_get_feature, HookType.AROUND)]
    source = registered[0][1]["source"]
    assert source.plugin_name == sglang_plugin.PLUGIN_NAME and source.dist_name is None
    assert len(applied) == 2


def test_the_settings_default_to_a_2s_wait_high_llm_priority_encoding_at_arrival_no_graphs_no_thread_uint8_pixels():
    assert settings.PLUGIN_DEFAULTS == {"llm_stream_priority": "high", "prefill_wait_ms": 2000.0,
                                        "defer_prefill_ms": 0.0, "early_encode_min_waiting": 0,
                                        "vit_graph_patches": [], "preprocess_thread": False, "uint8_pixels": True,
                                        "fast_mm_token_check": True, "tokenizer_torch_threads": None}


class _RecordedService:
    """Stands in for EncoderService in ``start``: records how it was built."""

    built: ClassVar[list[dict]] = []

    def __init__(self, tower, config, **kwargs) -> None:
        self.tower, self.config, self.kwargs = tower, config, kwargs
        self.mode = "lockstep" if kwargs["lockstep"] else "async"
        self.budget_bytes, self.bytes_per_patch = config.budget_bytes, 64
        _RecordedService.built.append({"tower": tower, "config": config, **kwargs})

    def start(self):
        return self

    def close(self) -> None:
        pass


@pytest.fixture
def start_recorded(monkeypatch):
    from mm_scheduler_sglang import adapters, modes, position_lookup, service, vision_attention

    _RecordedService.built = []
    towers = {"sharded": SimpleNamespace(collective_free=False), "replicated": SimpleNamespace(collective_free=True),
              "plain": SimpleNamespace()}
    monkeypatch.setattr(adapters, "why_unsupported", lambda model: None if model in towers else "not a VLM")
    monkeypatch.setattr(adapters, "tower_for", lambda model: towers[model])
    monkeypatch.setattr(vision_attention, "pass_uniform_max_seqlen", lambda model: 0)  # the models here are names
    monkeypatch.setattr(position_lookup, "look_up_positions", lambda model: 0)
    monkeypatch.setattr(service, "EncoderService", _RecordedService)
    monkeypatch.setattr(modes, "tp_agreement", lambda scheduler: ("agree over", scheduler))
    hooked = []
    monkeypatch.setattr(sglang_plugin, "_hook_model_class", lambda cls: hooked.append(cls))
    monkeypatch.setattr(sglang_plugin, "_defer_prefill_s", 0.0)

    def start(model, chosen, **kwargs):
        chosen = {"config_path": None, "values": {}, "mode": "auto", **chosen}
        return sglang_plugin.start(model, chosen, **kwargs)

    monkeypatch.setattr(sglang_plugin, "_service", None)  # before the yield: monkeypatch then restores None
    yield start, hooked


def test_start_builds_the_service_from_the_settings(start_recorded, caplog):
    import logging

    start, hooked = start_recorded
    caplog.set_level(logging.INFO, logger="mm_scheduler_sglang.sglang_plugin")
    plugin = {"llm_stream_priority": "high", "prefill_wait_ms": 250.0, "defer_prefill_ms": 150.0,
              "early_encode_min_waiting": 2}
    svc = start("plain", {"values": {"budget_bytes": 4096, "name": "q"}, "max_held_bytes": 1234, "plugin": plugin},
                tp_size=1)
    (built,) = _RecordedService.built
    assert sglang_plugin.active_service() is svc and hooked == [str]
    assert built["tower"] is not None and built["config"].budget_bytes == 4096 and built["config"].name == "q"
    assert built["lockstep"] is False and built["agree"] is None
    assert built["max_held_bytes"] == 1234 and built["prefill_wait_s"] == 0.25
    assert sglang_plugin._defer_prefill_s == 0.15 and sglang_plugin._early_encode_min_waiting == 2
    assert "mm-coalescer: async mode for str (budget 4096 bytes, 64 bytes/patch)" in caplog.text


def test_start_defaults_when_the_settings_omit_the_plugin_section_and_the_cap(start_recorded):
    start, _ = start_recorded
    start("plain", {}, tp_size=1)
    (built,) = _RecordedService.built
    assert built["max_held_bytes"] == 1024 * 2**20 and built["prefill_wait_s"] == 2.0
    assert sglang_plugin._defer_prefill_s == 0.0


def test_a_bad_value_in_settings_without_a_file_is_reported_against_the_defaults(start_recorded):
    from mm_scheduler import ConfigError

    start, _ = start_recorded
    with pytest.raises(ConfigError, match=r"^defaults: "):
        start("plain", {"values": {"budget_bytes": -5}}, tp_size=1)
    with pytest.raises(ConfigError, match=r"^/etc/mm\.yaml: "):
        start("plain", {"values": {"budget_bytes": -5}, "config_path": "/etc/mm.yaml"}, tp_size=1)


def test_tp_with_a_sharded_tower_forces_lockstep_and_agrees_failures_over_the_scheduler(start_recorded, caplog):
    start, _ = start_recorded
    scheduler = object()
    start("sharded", {"mode": "async"}, tp_size=2, scheduler=scheduler)
    built = _RecordedService.built[-1]
    assert built["lockstep"] is True and built["agree"] == ("agree over", scheduler)
    assert "MM_COALESCER_MODE=async ignored with TP=2 and a sharded vision tower; using lockstep" in caplog.text
    caplog.clear()
    start("sharded", {"mode": "auto"}, tp_size=2, scheduler=scheduler)
    assert _RecordedService.built[-1]["lockstep"] is True and "ignored" not in caplog.text  # nothing was asked
    start("sharded", {"mode": "lockstep"}, tp_size=1, scheduler=scheduler)  # one rank: nobody to agree with
    assert _RecordedService.built[-1]["agree"] is None
    start("sharded", {"mode": "lockstep"}, tp_size=2)  # no scheduler to agree over
    assert _RecordedService.built[-1]["agree"] is None


def test_tp_with_a_replicated_collective_free_tower_stays_async(start_recorded, caplog):
    start, _ = start_recorded
    start("replicated", {"mode": "auto"}, tp_size=2, scheduler=object())
    assert _RecordedService.built[-1]["lockstep"] is False and _RecordedService.built[-1]["agree"] is None
    start("plain", {"mode": "auto"}, tp_size=2, scheduler=object())  # a tower that does not say: sharded
    assert _RecordedService.built[-1]["lockstep"] is True


def test_start_leaves_an_unsupported_model_alone_saying_why(start_recorded, caplog):
    import logging

    start, hooked = start_recorded
    caplog.set_level(logging.INFO, logger="mm_scheduler_sglang.sglang_plugin")
    assert start("a text model", {}, tp_size=1) is None
    assert _RecordedService.built == [] and hooked == []
    assert "plugin off for this model (not a VLM); SGLang encodes its media as usual" in caplog.text


def test_the_prefix_match_needs_no_disable_flag_on_the_scheduler():
    scheduler = _scheduler_with_cached_prefix(9)
    del scheduler.disable_radix_cache
    assert sglang_plugin.cached_prefix_len(scheduler, _req("r", [])) == 9
