"""The plugin's uniform ``max_seqlen`` (integration/vision_attention.py) on real tiny SGLang Gemma towers on CUDA,
with SGLang's triton vision attention (what the real-server harness runs).

What would fail if it were wrong: a ``max_seqlen`` other than the batch's segment length changes the triton
kernel's grid and so the output (it is compared bit for bit with SGLang's own forward); and the wrapper not
reaching the layers leaves SGLang reading the value back from the GPU in every layer (counted).

Run: ``python -m pytest -q tests/gpu/test_vision_attention_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # sglang_models: tiny real SGLang models

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")

from mm_scheduler_sglang.adapters import tower_for
from mm_scheduler_sglang.vision_attention import pass_uniform_max_seqlen

from .cuda_helpers import tiny_on_cuda

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
@torch.inference_mode()
def test_a_forward_that_skips_the_read_back_equals_sglangs_own_bit_for_bit(family, monkeypatch):
    import sglang.srt.layers.attention.vision as vision
    import sglang_models

    model = tiny_on_cuda(family)
    tower = tower_for(model)
    items = [sglang_models.gemma3_image(model, 1, 90 + i) if family == "gemma3"
             else sglang_models.gemma4_image(model, 4, 4, 16, 90 + i) for i in range(3)]
    units = [u for item in items for u in tower.units(item)]
    given: list = []  # the max_seqlen each attention layer handed on; None: read back from the GPU
    resolve = vision.resolve_precomputed_max_seqlen
    monkeypatch.setattr(vision, "resolve_precomputed_max_seqlen",
                        lambda cu_seqlens, max_seqlen: given.append(max_seqlen) or resolve(cu_seqlens, max_seqlen))
    expected = torch.cat(tower.forward(units))
    assert given and all(value is None for value in given)
    layers = len(given)
    given.clear()
    assert pass_uniform_max_seqlen(model) > 0
    got = torch.cat(tower.forward(units))
    assert len(given) == layers and all(isinstance(value, int) and value > 0 for value in given)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
