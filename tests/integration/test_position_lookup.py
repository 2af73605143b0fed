"""Gemma 4's position embeddings by table lookup (integration/position_lookup.py) against SGLang's own one-hot product,
on SGLang's real ``Gemma4VisionPatchEmbedder`` at the E2B/E4B's full size (10,240 positions an axis), bit for bit; the
plugin applies it, once, to the model it serves, before it measures the tower's memory a patch."""

from __future__ import annotations

import pytest
import sglang_models as sm
import torch
from mm_scheduler_sglang import settings, sglang_plugin
from mm_scheduler_sglang.position_lookup import look_up_positions


def _embedder(dtype: torch.dtype):
    from sglang.srt.models.gemma4_vision import Gemma4VisionPatchEmbedder
    from transformers import Gemma4VisionConfig

    sm.init_sglang_cpu()
    embedder = Gemma4VisionPatchEmbedder(Gemma4VisionConfig()).to(dtype)
    torch.nn.init.normal_(embedder.position_embedding_table, generator=torch.Generator().manual_seed(1))
    return embedder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_lookup_equals_sglangs_one_hot_product_bit_for_bit_with_padding_zeroed(dtype):
    embedder = _embedder(dtype)
    positions = torch.randint(0, 10240, (2, 300, 2), generator=torch.Generator().manual_seed(2))
    positions[1, 200:] = -1  # padding patches
    padding = (positions == -1).all(dim=-1)
    expected = embedder._position_embeddings(positions, padding)
    assert look_up_positions(embedder) == 1 and look_up_positions(embedder) == 0  # once only
    got = embedder._position_embeddings(positions, padding)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert (got[1, 200:] == 0).all()


@torch.inference_mode()
def test_the_plugin_looks_positions_up_in_the_gemma4_model_it_serves_and_its_output_is_unchanged():
    sglang_plugin.stop()  # no service left by an earlier test: the expected output is SGLang's own
    model = sm.BUILDERS["gemma4"]()
    items = [sm.gemma4_image(model, 8, 8, 64, 1)]
    expected = model.get_image_feature(items)
    service = sglang_plugin.start(model, {"config_path": None, "mode": "async", "values": {"budget_bytes": 1 << 30},
                                          "plugin": dict(settings.PLUGIN_DEFAULTS)}, tp_size=1)
    try:
        assert hasattr(model.vision_tower.patch_embedder._position_embeddings, "looks_up")
        assert torch.equal(service.tower.encode_now(items, model.get_image_feature), expected)
    finally:
        sglang_plugin.stop()
