"""The real-server harness's free encoder (scripts/gpu_serve/sglang_backports/free_encoder.py), on SGLang's own model
classes: after one real call, zeros shaped exactly as SGLang's method shapes them, and the tower never runs again."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sglang_models as sm
from test_equivalence import MODALITIES, _items

PATCHES = Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve" / "sglang_backports"
sys.path.insert(0, str(PATCHES))
import free_encoder  # noqa: E402  (not sitecustomize: that would install the import hook in this process)


def _with_offsets(model, items: list, start: int = 5) -> list:
    """Each item's placeholder span, inclusive as SGLang 0.5.16 writes ``offsets``, one after another."""
    for item in items:
        tokens = sm.tokens_of(model, item)
        item.offsets = [(start, start + tokens - 1)]
        start += tokens + 2
    return items


@pytest.fixture(scope="module", params=list(sm.BUILDERS))
def family_model(request):
    return request.param, sm.BUILDERS[request.param]()


def _spied(model, modality: str) -> tuple[list[int], object]:
    calls: list[int] = []
    original = inspect.unwrap(getattr(type(model), f"get_{modality}_feature"))

    def method(m, items):
        calls.append(len(items))
        return original(m, items)

    method.__qualname__ = original.__qualname__
    return calls, free_encoder.free(method)


def test_after_one_real_call_the_free_encoder_returns_zeros_shaped_as_sglangs_method_without_the_tower(family_model):
    family, model = family_model
    for modality in MODALITIES[family]:
        calls, free = _spied(model, modality)
        first = _with_offsets(model, _items(family, model)[modality])
        real = free(model, first)
        again = _with_offsets(model, _items(family, model)[modality][:2], start=40)
        zeros = free(model, again)
        expected = inspect.unwrap(getattr(type(model), f"get_{modality}_feature"))(model, again)
        assert calls == [len(first)], "the tower ran again"
        assert (zeros.shape, zeros.dtype, zeros.device) == (expected.shape, expected.dtype, expected.device)
        assert not zeros.any() and real.any()


def test_a_method_whose_output_does_not_match_the_placeholder_tokens_keeps_running_for_real(family_model, caplog):
    family, model = family_model
    calls, free = _spied(model, "image")
    items = _with_offsets(model, _items(family, model)["image"])
    items[0].offsets = [(5, 5)]  # one token fewer than the tower makes for it (or more)
    free(model, items)
    again = free(model, items)
    assert calls == [len(items), len(items)] and again.any()
    assert "keeps running for real" in caplog.text


def test_a_server_process_named_for_it_gets_every_familys_methods_patched_on_import():
    code = ("from sglang.srt.models import qwen2_5_vl, qwen3_vl, gemma3_mm, gemma4_mm\n"
            "classes = [qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, qwen3_vl.Qwen3VLForConditionalGeneration,\n"
            "           gemma3_mm.Gemma3ForConditionalGeneration, gemma4_mm.Gemma4ForConditionalGeneration]\n"
            "print(all(hasattr(c.get_image_feature, '__wrapped__') for c in classes))")
    path = os.pathsep.join([str(PATCHES), os.environ.get("PYTHONPATH", "")])
    named = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": path, "GPU_SERVE_PATCHES": "free_encoder"})
    assert named.stdout.strip().splitlines()[-1:] == ["True"], named.stderr[-2000:]
    unnamed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": path, "GPU_SERVE_PATCHES": ""})
    assert unnamed.stdout.strip().splitlines()[-1:] == ["False"], unnamed.stderr[-2000:]
