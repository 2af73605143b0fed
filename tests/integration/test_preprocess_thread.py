"""``sglang.preprocess_thread``: multimodal preprocessing moves off the tokenizer manager's event loop.

The thread's mechanics run against a stand-in with SGLang's attribute layout (``_processor`` holding a tokenizer, a
``_tokenizer`` alias, ``process_mm_data_async``); the last section moves SGLang's real processors of the served
families (the harness's tiny model directories, on the CPU) and compares what they give with SGLang's own call. The
real TokenizerManager is exercised by the e2e Engine run (tests/e2e, ``tuned``), on both SGLang versions.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
import weakref
from types import SimpleNamespace

import pytest
import torch
from mm_scheduler_sglang import preprocess, sglang_compat

pytestmark = pytest.mark.timeout(60)


class HFProcessor:
    def __init__(self) -> None:
        self.tokenizer = SimpleNamespace(vocab={"a": 1})


class MMProcessor:
    """SGLang's BaseMultimodalProcessor as far as the move reads it."""

    def __init__(self) -> None:
        self._processor = HFProcessor()
        self._tokenizer = self._processor.tokenizer
        self.io_executor = object()  # shared by the clone, as in SGLang
        self.calls: list[tuple[str, object, object]] = []
        self.gate: asyncio.Event | None = None

    async def process_mm_data_async(self, image_data, **kwargs):
        await asyncio.sleep(0)  # it awaits loading, as SGLang's does
        self.calls.append((threading.current_thread().name, self._processor, self._tokenizer))
        if image_data == "bad":
            raise ValueError("bad image")
        if image_data == "slow":
            await asyncio.sleep(30)
        return {"input_ids": [len(image_data)]}


@pytest.fixture
def fresh_loop(monkeypatch):
    monkeypatch.setattr(preprocess, "_loop", None)
    yield
    if preprocess._loop is not None:
        preprocess._loop.stop()


def test_preprocessing_runs_on_its_own_thread_against_a_clone_and_answers_on_the_callers_loop(fresh_loop):
    mm = MMProcessor()
    original_hf = mm._processor
    tm = SimpleNamespace(mm_processor=mm)
    assert preprocess.move_off_the_loop(tm) is preprocess._loop

    async def two_requests():
        return await asyncio.gather(mm.process_mm_data_async(image_data=[1, 2]),
                                    mm.process_mm_data_async(image_data=[1]))

    assert asyncio.run(two_requests()) == [{"input_ids": [2]}, {"input_ids": [1]}]
    assert preprocess.stats() == {"calls": 2, "thread": "mm-coalescer-preprocess"}
    assert len(mm.calls) == 2  # (the shallow clone appends to the same list)
    for thread, hf, tokenizer in mm.calls:
        assert thread == "mm-coalescer-preprocess"
        assert hf is not original_hf and isinstance(hf, HFProcessor)  # a deep copy, used by that thread only
        assert tokenizer is hf.tokenizer and tokenizer is not original_hf.tokenizer
    assert mm._processor is original_hf and mm._tokenizer is original_hf.tokenizer  # the manager keeps its own


def test_every_report_every_calls_one_line_says_where_the_calls_waited(fresh_loop, caplog):
    mm = MMProcessor()
    preprocess.move_off_the_loop(SimpleNamespace(mm_processor=mm))
    preprocess._loop.report_every = 3

    async def five_requests():
        return await asyncio.gather(*(mm.process_mm_data_async(image_data=[1]) for _ in range(5)))

    with caplog.at_level("INFO", logger=preprocess.logger.name):
        asyncio.run(five_requests())
    lines = [r.getMessage() for r in caplog.records if "preprocess_thread, " in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("mm-coalescer: preprocess_thread, 3 calls in ")
    assert "to start on the thread" in lines[0] and "back on the tokenizer manager's loop" in lines[0]


def test_the_call_summary_gives_the_span_and_each_stages_median_and_max_in_ms():
    """Five calls (the median is the third), first submitted at 5 s: the span runs from there to the last answer."""
    calls = [(5.0, 5.010, 5.110, 5.111), (5.0, 5.020, 5.320, 7.320), (6.0, 6.030, 6.130, 6.140),
             (6.1, 6.140, 6.240, 6.245), (6.2, 6.250, 7.249, 7.250)]
    assert preprocess.summarize_calls(calls) == (
        "5 calls in 2.32 s (p50 / max ms): to start on the thread 30 / 50, on the thread 100 / 999, "
        "back on the tokenizer manager's loop 5 / 2000")


def test_stats_before_any_move_and_the_thread_never_holds_the_process_open(fresh_loop):
    assert preprocess.stats() == {"calls": 0, "thread": None}
    preprocess.move_off_the_loop(SimpleNamespace(mm_processor=MMProcessor()))
    assert preprocess._loop.thread.daemon and preprocess.stats() == {"calls": 0, "thread": "mm-coalescer-preprocess"}


def test_a_processor_whose_hf_processor_has_no_tokenizer_is_cloned_too():
    mm = MMProcessor()
    mm._processor, mm._tokenizer = SimpleNamespace(image_size=4), None
    clone = preprocess.isolated_clone(mm)
    assert clone._processor is not mm._processor and clone._processor.image_size == 4 and clone._tokenizer is None


def test_an_error_reaches_the_request_that_caused_it_and_the_next_request_is_served(fresh_loop):
    mm = MMProcessor()
    preprocess.move_off_the_loop(SimpleNamespace(mm_processor=mm))

    async def bad_then_good():
        with pytest.raises(ValueError, match="bad image"):
            await mm.process_mm_data_async(image_data="bad")
        return await mm.process_mm_data_async(image_data=[1, 2, 3])

    assert asyncio.run(bad_then_good()) == {"input_ids": [3]}


def test_cancelling_the_request_cancels_its_preprocessing_on_the_thread(fresh_loop):
    mm = MMProcessor()
    preprocess.move_off_the_loop(SimpleNamespace(mm_processor=mm))
    worker = preprocess._loop.loop

    async def cancel_midway():
        task = asyncio.ensure_future(mm.process_mm_data_async(image_data="slow"))
        while not mm.calls:  # it is sleeping on the thread's loop
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):  # the cancellation crosses to the other loop
            if not asyncio.run_coroutine_threadsafe(_pending(), worker).result(timeout=5):
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(cancel_midway())


def test_stopping_the_thread_answers_every_call_in_flight_and_refuses_later_ones(fresh_loop):
    mm = MMProcessor()
    preprocess.move_off_the_loop(SimpleNamespace(mm_processor=mm))

    async def stop_midway():
        task = asyncio.ensure_future(mm.process_mm_data_async(image_data="slow"))
        while not mm.calls:  # it is sleeping on the thread's loop
            await asyncio.sleep(0.01)
        await asyncio.to_thread(preprocess._loop.stop)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)  # answered, not left waiting for a loop that has stopped
        with pytest.raises(RuntimeError, match="has stopped"):
            await mm.process_mm_data_async(image_data="late")
        return not preprocess._loop.thread.is_alive()

    assert asyncio.run(stop_midway())


async def _pending() -> int:
    return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])


def test_one_thread_serves_every_tokenizer_manager_of_the_process(fresh_loop):
    first, second = MMProcessor(), MMProcessor()
    assert preprocess.move_off_the_loop(SimpleNamespace(mm_processor=first)) is \
        preprocess.move_off_the_loop(SimpleNamespace(mm_processor=second))


def test_nothing_moves_without_a_processor_or_where_sglang_already_runs_it_off_the_loop(fresh_loop, monkeypatch,
                                                                                        caplog):
    caplog.set_level(logging.INFO, logger="mm_scheduler_sglang")
    assert preprocess.move_off_the_loop(SimpleNamespace(mm_processor=None)) is None
    mm = MMProcessor()
    bound = mm.process_mm_data_async
    monkeypatch.setattr(sglang_compat, "processor_runs_off_loop", lambda processor: processor is mm)
    assert preprocess.move_off_the_loop(SimpleNamespace(mm_processor=mm)) is None
    assert mm.process_mm_data_async == bound and preprocess._loop is None
    assert "not needed" in caplog.text


def test_a_processor_that_cannot_be_cloned_keeps_sglangs_own_path(fresh_loop, caplog):
    mm = MMProcessor()
    mm._processor.lock = threading.Lock()  # deepcopy refuses locks
    bound = mm.process_mm_data_async
    assert preprocess.move_off_the_loop(SimpleNamespace(mm_processor=mm)) is None
    assert mm.process_mm_data_async == bound and "cannot clone" in caplog.text


def test_sglang_runs_the_processor_off_the_loop_itself_only_with_its_executor():
    with_executor = SimpleNamespace(mm_processor_executor=object())
    without = SimpleNamespace(mm_processor_executor=None)
    if sglang_compat.current().has("processor_executor"):  # 0.5.17+
        assert sglang_compat.processor_runs_off_loop(with_executor)
    else:  # 0.5.16: no such executor at all
        assert not sglang_compat.processor_runs_off_loop(with_executor)
    assert not sglang_compat.processor_runs_off_loop(without)


def test_the_callers_loop_keeps_running_while_a_request_is_preprocessed_synchronously(fresh_loop):
    """The point of the thread: SGLang's HF processor blocks the loop it runs on (no await inside); the
    tokenizer manager's own loop must keep answering meanwhile."""
    class Blocking(MMProcessor):
        async def process_mm_data_async(self, image_data, **kwargs):
            time.sleep(0.3)  # the HF processor's synchronous work
            return {"input_ids": [len(image_data)]}

    mm = Blocking()
    preprocess.move_off_the_loop(SimpleNamespace(mm_processor=mm))

    async def ticks_during_preprocessing():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        await mm.process_mm_data_async(image_data=[1])
        task.cancel()
        return ticks

    assert asyncio.run(ticks_during_preprocessing()) >= 5  # about 30 when the loop is free, 0 when blocked


@pytest.mark.parametrize("enabled", [True, False])
def test_the_tokenizer_manager_hook_moves_preprocessing_only_when_the_setting_is_on(fresh_loop, enabled):
    from mm_scheduler_sglang import settings, sglang_plugin

    chosen = {"plugin": {**settings.PLUGIN_DEFAULTS, "preprocess_thread": enabled}}
    mm = MMProcessor()
    bound = mm.process_mm_data_async
    tm = SimpleNamespace(mm_processor=mm)
    sglang_plugin._after_tokenizer_manager_init(None, tm, SimpleNamespace(**{settings.ATTR: chosen}), "port_args")
    assert (mm.process_mm_data_async != bound) is enabled
    sglang_plugin._after_tokenizer_manager_init(None, SimpleNamespace(mm_processor=MMProcessor()),
                                                server_args=SimpleNamespace(**{settings.ATTR: None}))  # plugin off


def test_the_tokenizer_manager_is_hooked_once_and_only_with_a_tokenizer_manager_setting_on(monkeypatch):
    """Importing SGLang's tokenizer manager installs its uvloop policy process-wide: the plugin hooks it only
    when a setting asks for it (in the launcher, where it is built): ``uint8_pixels`` or ``fast_mm_token_check``, on
    by default, or ``preprocess_thread``."""
    from mm_scheduler_sglang import settings, sglang_plugin

    registered: list = []
    monkeypatch.setattr(sglang_plugin.HookRegistry, "register", lambda target, hook, kind: registered.append(target))
    monkeypatch.setattr(sglang_plugin.HookRegistry, "apply_hooks", lambda: None)
    monkeypatch.setattr(sglang_plugin, "_tokenizer_manager_hooked", False)
    off = {"plugin": {**settings.PLUGIN_DEFAULTS, "preprocess_thread": False, "uint8_pixels": False,
                      "fast_mm_token_check": False}}
    for chosen in (None, off, {}):
        sglang_plugin._hook_tokenizer_manager(chosen)
    assert registered == []
    for on in ({"plugin": {**off["plugin"], "preprocess_thread": True}}, {"plugin": dict(settings.PLUGIN_DEFAULTS)},
               {"plugin": {**off["plugin"], "fast_mm_token_check": True}},
               {"plugin": {**off["plugin"], "tokenizer_torch_threads": 1}}):
        monkeypatch.setattr(sglang_plugin, "_tokenizer_manager_hooked", False)
        sglang_plugin._hook_tokenizer_manager(on)
        sglang_plugin._hook_tokenizer_manager(on)
    assert registered == [sglang_compat.TOKENIZER_MANAGER_INIT] * 4


@pytest.mark.parametrize("threads", [1, 3, None])
def test_the_tokenizer_manager_hook_sets_torchs_threads_only_with_a_count(threads, caplog):
    """``sglang.tokenizer_torch_threads``: the launcher's process (the tokenizer manager's) runs torch on that many
    threads; null leaves torch's own count."""
    import logging

    import torch
    from mm_scheduler_sglang import settings, sglang_plugin

    chosen = {"plugin": {**settings.PLUGIN_DEFAULTS, "uint8_pixels": False, "fast_mm_token_check": False,
                         "tokenizer_torch_threads": threads}}
    was = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with caplog.at_level(logging.INFO, logger="mm_scheduler_sglang.sglang_plugin"):
            sglang_plugin._after_tokenizer_manager_init(None, SimpleNamespace(mm_processor=None),
                                                        SimpleNamespace(**{settings.ATTR: chosen}))
        assert torch.get_num_threads() == (2 if threads is None else threads)
        lines = [r.getMessage() for r in caplog.records if "tokenizer_torch_threads" in r.getMessage()]
        assert lines == ([] if threads is None else [
            f"mm-coalescer: sglang.tokenizer_torch_threads: the tokenizer manager's process runs torch on {threads} "
            "thread(s), was 2"])
    finally:
        torch.set_num_threads(was)


def test_only_the_first_resolution_of_the_settings_hooks_the_tokenizer_manager(monkeypatch):
    """SGLang 0.5.23's schedulers run ``ServerArgs.resolve_once`` again on the arguments the launcher handed them,
    settings included: they must not import the tokenizer manager (and its uvloop policy) for the default
    ``uint8_pixels``."""
    from mm_scheduler_sglang import settings, sglang_plugin

    registered: list = []
    monkeypatch.setattr(sglang_plugin.HookRegistry, "register", lambda target, hook, kind: registered.append(target))
    monkeypatch.setattr(sglang_plugin.HookRegistry, "apply_hooks", lambda: None)
    monkeypatch.setattr(sglang_plugin, "_tokenizer_manager_hooked", False)
    for name in (settings.ENV_CONFIG, settings.ENV_MODE, settings.ENV_MAX_HELD_MB):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(settings.ENV_ENABLE, "1")
    in_a_scheduler = SimpleNamespace(**{settings.ATTR: {"plugin": dict(settings.PLUGIN_DEFAULTS)}})
    sglang_plugin._after_resolve_once(None, in_a_scheduler)
    assert registered == []
    in_the_launcher = SimpleNamespace()
    sglang_plugin._after_resolve_once(None, in_the_launcher)
    assert getattr(in_the_launcher, settings.ATTR)["plugin"]["uint8_pixels"] is True
    assert registered == [sglang_compat.TOKENIZER_MANAGER_INIT]


# --- the hand-over to /dev/shm, with SGLang's own wrap_shm_features and ShmPointerMMData --------------------------
@pytest.fixture
def shared_memory_transport(monkeypatch):
    """SGLang's one-node transport as its tokenizer manager sees it: features go through /dev/shm."""
    from sglang.srt.managers import mm_utils

    monkeypatch.setattr(mm_utils, "_is_default_tensor_transport", False)
    args = SimpleNamespace(skip_tokenizer_init=False)
    for name in ("get_server_args", "get_serving"):  # 0.5.16 reads the one, 0.5.23 the other
        monkeypatch.setattr(mm_utils, name, lambda: args, raising=False)
    return mm_utils


def processor_output(*features):
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    return SimpleNamespace(mm_items=[MultimodalDataItem(modality=Modality.IMAGE, feature=f) for f in features])


def segment_exists(name: str) -> bool:
    from multiprocessing import shared_memory

    try:
        segment = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    segment.close()
    return True


def test_the_hand_over_copies_features_to_shared_memory_and_the_scheduler_unpickles_sglangs_own_class(
        shared_memory_transport):
    import pickle

    pixels = torch.arange(24, dtype=torch.uint8).reshape(2, 12)
    patches = [torch.ones(3, 4), torch.zeros(2, 4)]  # a list feature (one tensor a crop): each wrapped alone
    output = processor_output(pixels, patches)
    assert preprocess.hand_over(output) is output
    single, listed = output.mm_items[0].feature, output.mm_items[1].feature
    pointers = [single, *listed]
    assert all(isinstance(p, shared_memory_transport.ShmPointerMMData) for p in pointers)
    assert all(segment_exists(p.shm_name) for p in pointers)

    received = pickle.loads(pickle.dumps([single, listed]))  # the send, then the scheduler
    assert type(received[0]) is shared_memory_transport.ShmPointerMMData  # no plugin class crosses the process
    assert torch.equal(received[0].materialize(), pixels)
    assert [torch.equal(r.materialize(), t) for r, t in zip(received[1], patches, strict=True)] == [True, True]
    names = [p.shm_name for p in pointers]
    del single, listed, pointers, output, received
    import gc

    gc.collect()
    assert not any(segment_exists(n) for n in names)  # unlinked by the scheduler's read, not left behind


def test_a_segment_whose_request_is_never_sent_is_unlinked_when_its_wrapper_is_dropped(shared_memory_transport):
    import gc

    output = preprocess.hand_over(processor_output(torch.ones(64, 16)))
    name = output.mm_items[0].feature.shm_name
    assert segment_exists(name)
    del output  # e.g. the request failed validation, or its client went away before the send
    gc.collect()
    assert not segment_exists(name)


def test_sglangs_own_hand_over_before_the_send_finds_nothing_left_to_copy(shared_memory_transport):
    output = preprocess.hand_over(processor_output(torch.ones(8, 8)))
    wrapper = output.mm_items[0].feature
    shared_memory_transport.wrap_shm_features(SimpleNamespace(mm_inputs=output))
    assert output.mm_items[0].feature is wrapper


def test_nothing_is_handed_over_where_sglangs_transport_is_not_shared_memory(shared_memory_transport, monkeypatch):
    monkeypatch.setattr(shared_memory_transport, "_is_default_tensor_transport", True)
    pixels = torch.ones(4, 4)
    output = preprocess.hand_over(processor_output(pixels))
    assert output.mm_items[0].feature is pixels
    assert preprocess.hand_over({"input_ids": [1]}) == {"input_ids": [1]}  # no items: nothing to do


def test_a_request_sampled_more_than_once_keeps_sglangs_own_hand_over_at_each_send(shared_memory_transport):
    """With n > 1 SGLang sends a warm-up and one request a sample, each with shallow copies of the tokenized
    request's items (0.5.16 ``_handle_batch_request``), and the scheduler unlinks a segment once it has read it: each
    send needs a segment of its own, which SGLang's own hand-over at each send makes from the tensor (review of
    e214c80). The plugin's hand-over leaves such a request alone, by its request's ``n``, keyword or positional."""
    import copy
    import pickle

    pixels = torch.arange(48, dtype=torch.uint8).reshape(4, 12)
    sampled = SimpleNamespace(sampling_params={"n": 3, "max_new_tokens": 8})
    output = preprocess.hand_over(processor_output(pixels), request_obj=sampled)
    assert output.mm_items[0].feature is pixels
    assert preprocess.hand_over(processor_output(pixels), [1], None, "text", sampled).mm_items[0].feature is pixels
    names = []
    for _ in range(3):  # the warm-up, then two samples: SGLang's send path, each read before the next is sent
        inputs = copy.copy(output)
        inputs.mm_items = [copy.copy(item) for item in output.mm_items]
        shared_memory_transport.wrap_shm_features(SimpleNamespace(mm_inputs=inputs))
        received = pickle.loads(pickle.dumps(inputs.mm_items[0].feature))
        names.append(received.shm_name)
        assert torch.equal(received.materialize(), pixels)
    assert len(set(names)) == 3
    assert preprocess.samples(SimpleNamespace(sampling_params=[{"n": 1}, {"n": 2}])) == 2
    assert preprocess.samples(SimpleNamespace(sampling_params=None)) == preprocess.samples(None) == 1


def test_the_hand_over_frees_the_feature_tensor_as_sglangs_send_does_and_a_second_send_fails_loudly(
        shared_memory_transport):
    """The tokenizer manager holds a request's items until its reply ends: a wrapper holding its tensor would keep
    every in-flight request's features in memory twice (audit of preprocess_thread, session 27)."""
    import gc
    import pickle

    pixels = torch.arange(48, dtype=torch.uint8).reshape(4, 12)
    expected, alive = pixels.clone(), weakref.ref(pixels)
    output = preprocess.hand_over(processor_output(pixels), request_obj=SimpleNamespace(sampling_params={"n": 1}))
    del pixels
    gc.collect()
    assert alive() is None
    wrapper = output.mm_items[0].feature
    assert torch.equal(pickle.loads(pickle.dumps(wrapper)).materialize(), expected)
    with pytest.raises(RuntimeError, match="sent twice"):
        pickle.dumps(wrapper)


def test_list_features_and_precomputed_embeddings_are_guarded_each_element_alone(shared_memory_transport):
    """A list feature (one tensor a crop) and an item's precomputed embeddings: each wrapper is sent as SGLang's
    own, and each dropped unsent unlinks its segment."""
    import gc
    import pickle

    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    crops = [torch.ones(3, 4), torch.zeros(2, 4)]
    embeddings = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    output = SimpleNamespace(mm_items=[MultimodalDataItem(modality=Modality.IMAGE, feature=crops),
                                       MultimodalDataItem(modality=Modality.IMAGE, precomputed_embeddings=embeddings)])
    preprocess.hand_over(output)
    pointers = [*output.mm_items[0].feature, output.mm_items[1].precomputed_embeddings]
    received = pickle.loads(pickle.dumps(pointers))
    assert [torch.equal(r.materialize(), t) for r, t in zip(received, [*crops, embeddings], strict=True)] == [
        True, True, True]

    unsent = preprocess.hand_over(processor_output(list(crops)))
    names = [p.shm_name for p in unsent.mm_items[0].feature]
    assert all(segment_exists(n) for n in names)
    del unsent, output, pointers, received
    gc.collect()
    assert not any(segment_exists(n) for n in names)


@pytest.mark.parametrize("why", ["none", "precompute_hash", "msgpack", "cuda_ipc", "on_device"])
def test_the_thread_hands_features_over_only_where_sglangs_own_hand_over_would_copy_them_to_shared_memory(
        fresh_loop, shared_memory_transport, monkeypatch, caplog, why):
    """With SGLANG_MM_PRECOMPUTE_HASH the tokenizer manager hashes the features as tensors after preprocessing;
    SGLang's msgpack transport encodes only its own wrapper class; cuda_ipc features never reach /dev/shm."""
    caplog.set_level(logging.INFO, logger="mm_scheduler_sglang")
    monkeypatch.setattr(sglang_compat, "tokenizer_manager_hashes_features", lambda: why == "precompute_hash")
    monkeypatch.setattr(sglang_compat, "pickles_ipc", lambda: why != "msgpack")

    class Producing(MMProcessor):
        mm_feature_transport = "cuda_ipc" if why == "cuda_ipc" else "cpu"
        keep_mm_feature_on_device = why == "on_device"  # 0.5.16's flag

        async def process_mm_data_async(self, image_data, **kwargs):
            return processor_output(torch.full((4, 4), float(len(image_data))))

    mm = Producing()
    preprocess.move_off_the_loop(SimpleNamespace(mm_processor=mm))
    output = asyncio.run(mm.process_mm_data_async(image_data=[1, 2]))
    feature = output.mm_items[0].feature
    if why == "none":
        assert isinstance(feature, shared_memory_transport.ShmPointerMMData)
        assert "and so does the hand-over" in caplog.text
    else:
        assert torch.equal(feature, torch.full((4, 4), 2.0))
        reason = {"precompute_hash": "SGLANG_MM_PRECOMPUTE_HASH", "msgpack": "SGLANG_USE_PICKLE_IPC",
                  "cuda_ipc": "--mm-feature-transport cuda_ipc",
                  "on_device": "do not go through /dev/shm"}[why]
        assert "not the hand-over: " in caplog.text and reason in caplog.text


def test_sglang_pickles_what_its_processes_send_by_default():
    assert sglang_compat.pickles_ipc() is True


# --- SGLang's real processors (the harness's tiny model directories), on the thread ----------------------------------
PROCESSOR_FAMILIES = ("qwen3_vl", "qwen2_5_vl", "gemma4", "gemma3")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    import sglang_models as sm

    parent = tmp_path_factory.mktemp("models")
    return {family: sm.model_dir(parent, family) for family in PROCESSOR_FAMILIES}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", PROCESSOR_FAMILIES)  # qwen3_vl ships preprocess_thread
def test_sglangs_own_processor_on_the_thread_gives_what_it_gives_on_the_loop(model_dirs, family, fresh_loop):
    """Input ids, items, offsets and every feature tensor of a two-image request equal SGLang's own call's, the HF
    processor ran on the plugin's thread against a clone, and the processor SGLang keeps is left untouched. On
    SGLang 0.5.17+ as with ``--mm-processor-worker-num 1``, where SGLang leaves the processor on its loop (by default
    it runs these families' off the loop itself, and nothing moves)."""
    import sglang_models as sm

    urls = [sm.image_url(480, 360, 1), sm.image_url(300, 500, 2)]
    with sm.mm_processor(model_dirs[family], on_the_loop=True) as build:
        own, moved = build(), build()
        expected = sm.process_images(own, urls)
        original, seen = moved._processor, []
        cls = type(moved)
        wrapped = cls.process_mm_data_async

        async def recorded(processor, *args, **kwargs):
            seen.append((threading.current_thread().name, processor is moved, processor._processor is original))
            return await wrapped(processor, *args, **kwargs)

        cls.process_mm_data_async = recorded  # the move binds the clone's method: this one
        try:
            thread = preprocess.move_off_the_loop(SimpleNamespace(mm_processor=moved))
            assert thread is not None
            got = sm.process_images(moved, urls)
        finally:
            cls.process_mm_data_async = wrapped
    assert seen == [(thread.thread.name, False, False)]  # on the thread, by a clone with an HF processor of its own
    assert list(got.input_ids) == list(expected.input_ids)
    received = pickle.loads(pickle.dumps(got.mm_items))  # the send; features the thread handed to /dev/shm are read
    for item in received:
        item.feature = materialized(item.feature)
    assert len(received) == len(expected.mm_items) > 0
    for mine, theirs in zip(received, expected.mm_items, strict=True):
        assert_same(vars(mine), vars(theirs))


def materialized(feature):
    """A feature as the scheduler reads it: SGLang's /dev/shm pointers (``ShmPointerMMData``) become tensors."""
    if isinstance(feature, list):
        return [materialized(f) for f in feature]
    return feature.materialize() if hasattr(feature, "materialize") else feature


def assert_same(mine, theirs, where: str = "item") -> None:
    """Equal values, tensors element for element, through lists and dicts."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(mine, torch.Tensor) and mine.dtype == theirs.dtype and torch.equal(mine, theirs), where
    elif isinstance(theirs, dict):
        assert mine.keys() == theirs.keys(), where
        for key in theirs:
            assert_same(mine[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert len(mine) == len(theirs), where
        for k, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert_same(a, b, f"{where}[{k}]")
    else:
        assert mine == theirs, where
