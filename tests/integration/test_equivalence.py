"""Hooked get_image_feature / get_video_feature return what SGLang's own methods return.

Every model is a real SGLang class (see sglang_models for how the Gemma ones are assembled on CPU),
fed real ``MultimodalDataItem`` objects, once directly and once through SGLang's ``embed_mm_inputs``
with several requests in one prefill batch.
"""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import sglang_models as sm
import torch
from mm_scheduler_sglang import sglang_plugin
from torch import nn

# fp32 on CPU: a different batch composition changes reduction order, nothing else.
ATOL, RTOL = 1e-4, 1e-3
# What each family serves through the coalescer (README "Supported"): one hooked method per modality.
MODALITIES = {"qwen2_5_vl": ("image", "video"), "qwen3_vl": ("image", "video"), "gemma3": ("image",),
              "gemma4": ("image", "video")}


def _items(family: str, model: nn.Module) -> dict[str, list]:
    """Per modality, items of mixed sizes (and a repeat of one image) for one prefill."""
    if family.startswith("qwen"):
        images = [sm.qwen_image(model, 4, 4, 1), sm.qwen_image(model, 8, 4, 2), sm.qwen_image(model, 4, 6, 3)]
        videos = [sm.qwen_video(model, 3, 4, 4, 4), sm.qwen_video(model, 2, 6, 4, 5)]
        return {"image": images, "video": videos}
    if family == "gemma3":
        return {"image": [sm.gemma3_image(model, 1, 1), sm.gemma3_image(model, 2, 2), sm.gemma3_image(model, 1, 3)]}
    images = [sm.gemma4_image(model, 8, 8, 64, 1), sm.gemma4_image(model, 4, 8, 64, 2),
              sm.gemma4_image(model, 4, 4, 16, 3)]
    videos = [sm.gemma4_video(model, sm.gemma4_video_frames(model), 4, 4, 16, 4)]
    return {"image": images, "video": videos}


def _original(model: nn.Module, modality: str):
    return inspect.unwrap(getattr(type(model), f"get_{modality}_feature")).__get__(model)


@pytest.fixture(scope="module", params=list(sm.BUILDERS))
def family_model(request):
    return request.param, sm.BUILDERS[request.param]()


@pytest.fixture(params=["async", "lockstep"])
def service(request, family_model):
    _, model = family_model
    svc = sglang_plugin.start(model, {"config_path": None, "mode": request.param,
                                      "values": {"budget_bytes": 1 << 30, "max_wait_ms": 1.0}}, tp_size=1)
    yield svc
    sglang_plugin.stop()


class UnitsByModality:
    """Wraps the service's tower: counts the units of each modality that its forwards run."""

    def __init__(self, tower) -> None:
        self.counts: Counter[str] = Counter()
        self._forward = tower.forward
        tower.forward = self

    def __call__(self, units):
        self.counts.update(u.modality for u in units)
        return self._forward(units)


def test_hooked_feature_methods_equal_sglang_originals(family_model, service):
    """Each ``get_<modality>_feature`` call goes through the service (its own counter and tower forward
    deltas, per call: an unhooked method returns the original's output and moves neither) and returns
    what SGLang's own method returns."""
    family, model = family_model
    forwarded = UnitsByModality(service.tower)
    items_by_modality = _items(family, model)
    assert set(items_by_modality) == set(MODALITIES[family])
    for modality, items in items_by_modality.items():
        with torch.no_grad():
            expected = _original(model, modality)(items)
            on_demand, units = service.counts["encoded_on_demand"], dict(forwarded.counts)
            fallbacks = service.counts["fallbacks"]
            got = getattr(model, f"get_{modality}_feature")(items)
        assert service.counts["encoded_on_demand"] - on_demand == len(items), (family, modality, "not routed")
        # the coalesced result itself, not SGLang's method run again because assembling it failed
        assert service.counts["fallbacks"] == fallbacks, (family, modality, "fell back to SGLang's method")
        ran = {m: forwarded.counts[m] - units.get(m, 0) for m in forwarded.counts}
        assert ran.get(modality, 0) >= len(items) and sum(ran.values()) == ran[modality], (family, modality, ran)
        assert got.shape == expected.shape, (family, modality)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_plugin_hooks_exactly_the_feature_methods_of_each_supported_model(family_model):
    """The plugin's allow-list names, for each model class, one method per modality it serves."""
    from mm_scheduler_sglang.adapters import SUPPORTED_MODELS, qualified_name

    family, model = family_model
    declared = SUPPORTED_MODELS.get(qualified_name(type(model)))
    assert declared is not None, f"{type(model).__name__} is not in the plugin's SUPPORTED_MODELS"
    assert sorted(declared) == sorted(f"get_{m}_feature" for m in MODALITIES[family])


def _mm_inputs(model: nn.Module, items: list, start: int):
    """A real MultimodalInputs whose placeholder spans sit after ``start`` text tokens."""
    from sglang.srt.managers.schedule_batch import MultimodalInputs

    pos, ids = start, list(range(1, start + 1))
    for item in items:
        n = sm.tokens_of(model, item)
        item.offsets = [(pos, pos + n - 1)]
        ids += [item.pad_value] * n + [7]
        pos += n + 1
    return MultimodalInputs(mm_items=items), ids


def _embed(model: nn.Module, requests: list[tuple[list, int]], chunks: list[tuple[int, int]]):
    """SGLang's embed_mm_inputs for one batch; ``chunks`` gives each request's (prefix_len, extend_len)."""
    from sglang.srt.managers.mm_utils import embed_mm_inputs

    mm_list, ids_all = [], []
    for (items, start), (prefix, extend) in zip(requests, chunks, strict=True):
        mm, ids = _mm_inputs(model, items, start)
        mm_list.append(mm)
        ids_all += ids[prefix:prefix + extend]
    embedding = nn.Embedding(1000, model.config.text_config.hidden_size)
    nn.init.zeros_(embedding.weight)
    use_deepstack = getattr(model, "use_deepstack", {})  # Qwen3-VL passes this in its forward
    with torch.no_grad():
        embeds, info = embed_mm_inputs(mm_list, [c[0] for c in chunks], [c[1] for c in chunks],
                                       torch.tensor(ids_all), embedding, multimodal_model=model,
                                       use_deepstack=use_deepstack)
    if use_deepstack:
        return torch.cat([embeds, info["input_deepstack_embeds"]], dim=-1)
    return embeds


def _request_lengths(model, requests):
    return [start + sum(sm.tokens_of(model, i) + 1 for i in items) for items, start in requests]


def test_embed_mm_inputs_batch_of_requests_equals_sglang_path(family_model):
    """Three requests in one prefill batch (one repeats an image): same embeddings with the plugin."""
    family, model = family_model
    items = _items(family, model)
    first = items["image"]
    second = items.get("video", [])
    requests = [(first[:2], 3), (first[2:] + second, 5), ([first[0]], 2)]
    full = [(0, n) for n in _request_lengths(model, requests)]
    expected = _embed(model, requests, full)
    service = sglang_plugin.start(model, {"config_path": None, "mode": "async", "values": {}}, tp_size=1)
    try:
        got = _embed(model, requests, full)
        routed = service.counts["encoded_on_demand"]
    finally:
        sglang_plugin.stop()
    assert routed == len({i.hash for items, _ in requests for i in items})
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_declared_output_bytes_bound_each_items_embedding(family_model):
    """The cap on held early results counts these bytes: exact for fixed layouts, an upper bound for Gemma4."""
    from mm_scheduler_sglang.adapters import tower_for

    family, model = family_model
    tower = tower_for(model)
    for modality, items in _items(family, model).items():
        for item in items:
            with torch.no_grad():
                nbytes = _original(model, modality)([item]).nbytes
            if family == "gemma4":
                assert nbytes <= tower.output_bytes(item) <= 2 * nbytes
            else:
                assert tower.output_bytes(item) == nbytes
