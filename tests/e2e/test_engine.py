"""End to end: the real ``sglang.Engine`` on CPU with a tiny random Qwen2.5-VL, plugin off vs on.

The plugin is enabled as the README tells Engine users (``MM_COALESCER=1``,
``MM_COALESCER_CONFIG=configs/qwen2_5_vl.yaml``, the file unchanged: on CPU ``bytes_per_patch: auto``
falls back to the tower's declared value and the 2 GiB budget is far above these images). Requests:
four concurrent ones (one with two images, two sharing an image), one aborted while decoding, then a
repeat of a finished request (its prompt prefix is in the radix cache), then an 8-frame video (MJPEG
AVI, decoded by SGLang with decord; torchcodec is not used: it needs system FFmpeg libraries, absent here).

Counters are the plugin's Prometheus series as SGLang's ``/metrics`` would serve them, read from the
Engine's ``PROMETHEUS_MULTIPROC_DIR`` with prometheus_client's MultiProcessCollector (the scheduler
process writes them there; ``enable_metrics=True``).

Test-harness shims (tests/e2e/harness/shims, first on PYTHONPATH of every SGLang process), nothing else:
* ``sgl_kernel``: a stand-in package for eight CPU kernel names SGLang imports at module load and an
  image request never calls (each raises if called).
* ``sitecustomize.py``: resolves nine ``torch.ops.sgl_kernel.*_cpu`` names bound at import (raising if
  called; all other names stay absent), and makes ``Tensor.pin_memory`` a no-op without CUDA (SGLang's
  Qwen video preprocessing pins frames).
Environment: ``SGLANG_USE_CPU_ENGINE=1``, offline hub flags, ``TORCHDYNAMO_DISABLE=1``.
"""

from __future__ import annotations

from typing import Any

import pytest

from .harness import scenario

pytestmark = pytest.mark.e2e


def test_engine_greedy_ids_identical_with_plugin_off_and_on(engine_runs: dict[str, Any]) -> None:
    off, on = engine_runs["off"]["results"], engine_runs["on"]["results"]
    requests = scenario.requests(with_video=engine_runs["on"]["video_decoder"] is not None)
    assert set(off) == set(on) == {r.name for r in requests}
    for req in requests:
        if req.abort:
            continue
        assert len(off[req.name]["output_ids"]) == scenario.MAX_NEW_TOKENS, req.name
        assert on[req.name]["output_ids"] == off[req.name]["output_ids"], req.name


def test_engine_with_encoding_always_at_arrival_and_deferred_prefills_greedy_ids_equal_plugin_off(
        engine_runs: dict[str, Any]) -> None:
    """``early_encode_min_waiting: 0`` and ``defer_prefill_ms`` read and reorder SGLang's real waiting queue."""
    off, tuned = engine_runs["off"]["results"], engine_runs["tuned"]["results"]
    requests = scenario.requests(with_video=engine_runs["tuned"]["video_decoder"] is not None)
    assert set(tuned) == {r.name for r in requests}
    for req in requests:
        if req.abort:
            assert tuned[req.name]["finish"]["type"] == "abort", tuned[req.name]
            continue
        assert tuned[req.name]["output_ids"] == off[req.name]["output_ids"], req.name


def test_engine_a_request_of_two_samples_gets_plugin_offs_greedy_ids_in_both(engine_runs: dict[str, Any]) -> None:
    """n = 2: SGLang sends the request's items once per sample (shallow copies); with ``preprocess_thread`` (the
    ``tuned`` run) the features were handed to /dev/shm on its thread, and each send needs a segment of its own:
    on 0.5.16 a segment sent twice killed the scheduler (a review of e214c80)."""
    expected = engine_runs["off"]["results"]["one_image_b"]["output_ids"]
    for label in ("off", "on", "tuned"):
        assert engine_runs[label]["two_samples"] == [expected, expected], label


def test_engine_with_the_shipped_config_a_lone_request_on_an_idle_coalescer_runs_inline(
        engine_runs: dict[str, Any]) -> None:
    """The video comes alone (its own phase): nothing waits ahead of it, so the shipped config
    (``early_encode_min_waiting: 1``) leaves it to its prefill, which finds the coalescer idle and encodes it on
    the scheduler thread (SGLang's own method: no graphs on CPU); nothing falls back or fails. With the gate at 0
    nothing runs inline."""
    on = engine_runs["on"]["metrics"]
    assert engine_runs["on"]["video_decoder"] is not None, "no video decoder (decord/torchcodec) installed"
    assert scenario.counter(on, "mm_coalescer_prefill_items_total{source=inline}") >= 1, on
    assert scenario.counter(on, "mm_coalescer_prefill_items_total{source=fallback}") == 0, on
    assert scenario.counter(on, "mm_coalescer_requests_total{outcome=error}") == 0, on
    tuned = engine_runs["tuned"]["metrics"]
    assert scenario.counter(tuned, "mm_coalescer_prefill_items_total{source=inline}") == 0, tuned


def test_engine_with_preprocess_thread_preprocesses_on_its_own_thread_unless_sglang_already_does(
        engine_runs: dict[str, Any]) -> None:
    """``preprocess_thread``: SGLang's real tokenizer manager sent every multimodal request's preprocessing to the
    plugin's thread (0.5.16), or left it to SGLang's own processor threads where they exist (0.5.17+); the
    replies are those of plugin off (test above)."""
    tuned = engine_runs["tuned"]["preprocessing"]
    with_media = [r for r in scenario.requests(with_video=engine_runs["tuned"]["video_decoder"] is not None)
                  if r.images or r.video]
    if tuned["sglang_off_loop"]:
        assert {k: tuned[k] for k in ("calls", "thread")} == {"calls": 0, "thread": None}
    else:
        assert tuned["thread"] == "mm-coalescer-preprocess" and tuned["calls"] >= len(with_media), tuned
    assert engine_runs["on"]["preprocessing"]["calls"] == 0  # off unless set


def test_engine_with_uint8_pixels_sends_qwens_normalized_pixels_as_uint8_and_the_replies_stay_those_of_plugin_off(
        engine_runs: dict[str, Any]) -> None:
    """``uint8_pixels`` (on by default) hooks SGLang's real tokenizer manager: Qwen2.5-VL's image processor stops
    rescaling and normalizing (CLIP's mean and std), its uint8 pixels reach the scheduler, which widens them by its
    own copy of the processor, and the greedy replies are those of plugin off (tests above); off leaves it as is."""
    for label in ("on", "tuned"):
        preprocessing = engine_runs[label]["preprocessing"]
        assert preprocessing["rescales"] is False
        assert [line for line in preprocessing["startup_lines"] if "uint8_pixels" in line] == [
            "mm-coalescer: sglang.uint8_pixels: QwenVLImageProcessor sends image pixels as uint8"], \
            preprocessing["startup_lines"]
    assert engine_runs["off"]["preprocessing"]["rescales"] is True
    assert not [line for line in engine_runs["off"]["preprocessing"]["startup_lines"] if "uint8_pixels" in line]


def test_engine_with_fast_mm_token_check_gives_an_old_transformers_the_check_of_5_17_and_leaves_a_new_one_alone(
        engine_runs: dict[str, Any]) -> None:
    """``fast_mm_token_check`` (on by default) in SGLang's real tokenizer manager: with transformers older than 5.17
    (SGLang 0.5.16 pins 5.12.1) its HF processors count image tokens on lists; with 5.17 or later (0.5.23 pins
    5.19.0) one line says there is nothing to do. The replies are those of plugin off either way (tests above)."""
    for label in ("on", "tuned"):
        preprocessing = engine_runs[label]["preprocessing"]
        version = preprocessing["transformers"]
        old = tuple(int(part) for part in version.split(".")[:2]) < (5, 17)
        assert preprocessing["token_check_installed"] is old
        assert [line for line in preprocessing["startup_lines"] if "fast_mm_token_check" in line] == [
            "mm-coalescer: sglang.fast_mm_token_check: HF processors count image tokens as transformers 5.17 does"
            if old else f"mm-coalescer: sglang.fast_mm_token_check has no effect: transformers {version} has the "
                        "check of 5.17 (huggingface/transformers#47580) already"], preprocessing["startup_lines"]
    assert engine_runs["off"]["preprocessing"]["token_check_installed"] is False


def test_engine_with_tokenizer_torch_threads_runs_the_tokenizer_managers_torch_on_that_many_threads(
        engine_runs: dict[str, Any]) -> None:
    """``tokenizer_torch_threads: 1`` (the shipped ``qwen2_5_vl``, ``on``) hooks SGLang's real tokenizer manager: the
    launcher's process (the Engine's own, where it runs) then runs torch on one thread, with one start-up line; the
    replies are those of plugin off (tests above). Set back to null (``tuned``), torch keeps its own count and nothing
    is said."""
    on = engine_runs["on"]["preprocessing"]
    assert on["torch_threads"] == 1
    assert [line for line in on["startup_lines"] if "tokenizer_torch_threads" in line] == [
        "mm-coalescer: sglang.tokenizer_torch_threads: the tokenizer manager's process runs torch on 1 thread(s), "
        f"was {engine_runs['off']['preprocessing']['torch_threads']}"], on["startup_lines"]
    tuned = engine_runs["tuned"]["preprocessing"]
    assert not [line for line in tuned["startup_lines"] if "tokenizer_torch_threads" in line]
    assert tuned["torch_threads"] == engine_runs["off"]["preprocessing"]["torch_threads"]


def test_engine_output_depends_on_the_image(engine_runs: dict[str, Any]) -> None:
    """Guards the equality test: a wrong image embedding must be able to change the ids."""
    off = engine_runs["off"]["results"]
    assert off["one_image_a"]["output_ids"] != off["one_image_b"]["output_ids"]
    assert off["repeat_of_one_image_a"]["output_ids"] == off["one_image_a"]["output_ids"]


def test_engine_video_is_served_when_a_decoder_is_installed(engine_runs: dict[str, Any]) -> None:
    assert engine_runs["on"]["video_decoder"] is not None, "no video decoder (decord/torchcodec) installed"
    assert "video" in engine_runs["on"]["results"]


def test_engine_aborted_request_ends_as_aborted(engine_runs: dict[str, Any]) -> None:
    for label in ("off", "on"):
        aborted = engine_runs[label]["results"]["aborted_e"]
        assert aborted["finish"]["type"] == "abort", (label, aborted)


def test_engine_items_are_served_by_the_plugin_not_the_fallback(engine_runs: dict[str, Any]) -> None:
    """Shipped config: from the coalescer, or inline on an idle one (how many of each depends on when SGLang hands
    requests over). Media always encoded at arrival: every distinct item through the coalescer."""
    off, on, tuned = (engine_runs[label]["metrics"] for label in ("off", "on", "tuned"))
    with_video = engine_runs["on"]["video_decoder"] is not None
    assert off == {}, "plugin off must add no mm_coalescer series"
    for metrics in (on, tuned):
        assert scenario.counter(metrics, "mm_coalescer_prefill_items_total{source=fallback}") == 0, metrics
        assert scenario.counter(metrics, "mm_coalescer_requests_total{outcome=error}") == 0, metrics
    assert scenario.served_by_plugin(on) >= scenario.distinct_media(with_video), on
    assert scenario.taken_by_prefill(tuned) >= scenario.distinct_media(with_video), tuned
    assert scenario.counter(tuned, "mm_coalescer_forwards_total") >= 1, tuned
    assert scenario.counter(tuned, "mm_coalescer_units_total") >= scenario.distinct_media(with_video), tuned


def test_engine_every_item_encoded_at_arrival_is_taken_by_a_prefill(engine_runs: dict[str, Any]) -> None:
    for label in ("on", "tuned"):
        metrics = engine_runs[label]["metrics"]
        # Qwen2.5-VL: one unit per image and per video, so units submitted == items some prefill took.
        assert scenario.counter(metrics, "mm_coalescer_units_total") == scenario.taken_by_prefill(metrics), label


def test_engine_logs_each_feature_this_sglang_lacks_once(engine_runs: dict[str, Any]) -> None:
    """0.5.16: one line (no abort hook: the sweep releases aborted requests); 0.5.23: none. Plugin off: none."""
    from mm_scheduler_sglang import sglang_compat, sglang_plugin

    expected = sglang_compat.current().degraded(sglang_plugin.SCHEDULER_FEATURES)
    for label, lines in (("off", []), ("on", expected)):
        # "mm-coalescer: sglang <version>: ...", not the settings' lines ("mm-coalescer: sglang.uint8_pixels ...")
        logged = [line[line.index("mm-coalescer: sglang "):] for line in engine_runs[label]["log"].splitlines()
                  if "mm-coalescer: sglang " in line]
        assert logged == lines, (label, logged)


def test_a_free_encoder_server_serves_every_request_with_sglangs_offsets_and_no_tower_after_its_first_call(
        free_encoder_run: dict[str, Any]) -> None:
    """The harness's floor server (``off+freeenc``) in a real Engine: each embedding method's first output matched the
    placeholder tokens of its items' offsets, so every later call skipped the tower, and every request finished."""
    results, log = free_encoder_run["results"], free_encoder_run["log"]
    requests = scenario.requests(with_video=free_encoder_run["video_decoder"] is not None)
    for req in requests:
        if not req.abort:
            assert len(results[req.name]["output_ids"]) == scenario.MAX_NEW_TOKENS, req.name
    assert "keeps running for real" not in log
    assert "free encoder: Qwen2_5_VLForConditionalGeneration.get_image_feature returns zeros" in log
    if free_encoder_run["video_decoder"] is not None:
        assert "free encoder: Qwen2_5_VLForConditionalGeneration.get_video_feature returns zeros" in log
