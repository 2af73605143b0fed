"""SGLang's real ``VisionTritonAttention`` gets the longest segment of a uniform batch from the plugin instead of
reading it back from the GPU (integration/vision_attention.py). The triton kernel needs CUDA, so here it is
replaced by a recorder of what it was given; tests/gpu/test_vision_attention_cuda.py runs it for real."""

from __future__ import annotations

import pytest
import sglang_models as sm
import torch
from mm_scheduler_sglang import settings, sglang_plugin
from mm_scheduler_sglang.vision_attention import pass_uniform_max_seqlen
from torch import nn


@pytest.fixture
def kernel_calls(monkeypatch):
    """``context_attention_fwd`` and ``resolve_precomputed_max_seqlen`` as SGLang's backend calls them: the
    max_seqlen each was given (None: the backend would read it from the GPU)."""
    import sglang.srt.layers.attention.vision as vision

    calls: dict[str, list] = {"resolved_from": [], "kernel": []}
    resolve = vision.resolve_precomputed_max_seqlen

    def spy_resolve(cu_seqlens, max_seqlen):
        calls["resolved_from"].append(max_seqlen)
        return resolve(cu_seqlens, max_seqlen)

    def kernel(q, k, v, output, cu_seqlens, seq_lens, max_seqlen, **kwargs):
        calls["kernel"].append((cu_seqlens.tolist(), max_seqlen))

    monkeypatch.setattr(vision, "resolve_precomputed_max_seqlen", spy_resolve)
    monkeypatch.setattr(vision, "context_attention_fwd", kernel)
    return calls


def _backend() -> nn.Module:
    from sglang.srt.layers.attention.vision import VisionTritonAttention

    return VisionTritonAttention(use_data_parallel=True)


def _qkv(bsz: int, seq_len: int) -> dict:
    q = torch.zeros(bsz * seq_len, 2, 4)
    return {"q": q, "k": q, "v": q}


def test_a_uniform_batch_passes_its_segment_length_and_the_kernel_gets_the_same_arguments(kernel_calls):
    holder = nn.ModuleList([_backend(), _backend()])
    holder[0].forward(**_qkv(2, 5), cu_seqlens=None, bsz=2, seq_len=5, softmax_scale=1.0)
    before = kernel_calls["kernel"][:]
    assert kernel_calls["resolved_from"] == [None]  # SGLang alone: read back from the GPU
    assert pass_uniform_max_seqlen(holder) == 2
    assert pass_uniform_max_seqlen(holder) == 0  # once only
    holder[0].forward(**_qkv(2, 5), cu_seqlens=None, bsz=2, seq_len=5, softmax_scale=1.0)
    assert kernel_calls["resolved_from"] == [None, 5]
    assert kernel_calls["kernel"] == before * 2  # the same segments and the same max: [0, 5, 10], 5


def test_calls_that_bring_their_own_segments_or_max_are_left_as_they_are(kernel_calls):
    holder = nn.ModuleList([_backend()])
    pass_uniform_max_seqlen(holder)
    packed = torch.tensor([0, 3, 10], dtype=torch.int32)  # a packed (Qwen-like) batch: segments of 3 and 7
    holder[0].forward(**_qkv(1, 10), cu_seqlens=packed, bsz=1, seq_len=10, softmax_scale=1.0)
    holder[0].forward(**_qkv(2, 5), cu_seqlens=None, bsz=2, seq_len=5, max_seqlen=4, softmax_scale=1.0)
    assert kernel_calls["resolved_from"] == [None, 4]
    assert [max_seqlen for _, max_seqlen in kernel_calls["kernel"]] == [7, 4]


def test_the_plugin_wraps_the_triton_vision_attention_of_the_model_it_serves():
    model = sm.gemma4()
    backends = []
    for module in model.modules():
        if hasattr(module, "qkv_backend"):  # what --mm-attention-backend triton_attn builds on CUDA
            module.qkv_backend = _backend()
            backends.append(module.qkv_backend)
    assert backends
    sglang_plugin.start(model, {"config_path": None, "mode": "async", "values": {"budget_bytes": 1 << 30},
                                "plugin": settings.PLUGIN_DEFAULTS}, tp_size=1)
    try:
        assert all(getattr(b.forward, "passes_uniform_max_seqlen", False) for b in backends)
    finally:
        sglang_plugin.stop()
