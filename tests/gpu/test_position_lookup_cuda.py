"""Gemma 4's position embeddings by table lookup (integration/position_lookup.py) on CUDA, against SGLang's one-hot
product at the E2B/E4B's full size, bit for bit in bf16 (cuBLAS may sum the product's exact zeros in any order or
precision: the result is still one table row), and the activation memory it no longer takes.

Run: ``python -m pytest -q tests/gpu/test_position_lookup_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # sglang_models: SGLang set up without a server

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")

from mm_scheduler_sglang.position_lookup import look_up_positions

pytestmark = pytest.mark.gpu


def _peak(call) -> tuple[torch.Tensor, int]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base


@torch.inference_mode()
def test_the_lookup_equals_sglangs_one_hot_product_on_cuda_and_takes_a_fraction_of_its_memory():
    import sglang_models
    from sglang.srt.models.gemma4_vision import Gemma4VisionPatchEmbedder
    from transformers import Gemma4VisionConfig

    sglang_models.init_sglang_cpu()
    embedder = Gemma4VisionPatchEmbedder(Gemma4VisionConfig()).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(embedder.position_embedding_table)
    ys, xs = torch.meshgrid(torch.arange(42), torch.arange(60), indexing="ij")  # one 2,520-patch image
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1).unsqueeze(0).cuda()
    positions[0, 2000:] = -1
    padding = (positions == -1).all(dim=-1)
    expected, one_hot_bytes = _peak(lambda: embedder._position_embeddings(positions, padding))
    assert look_up_positions(embedder) == 1
    got, lookup_bytes = _peak(lambda: embedder._position_embeddings(positions, padding))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert one_hot_bytes > 400e6 and lookup_bytes < one_hot_bytes / 20
