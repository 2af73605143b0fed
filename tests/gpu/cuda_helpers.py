"""What the CUDA tower tests share: how bf16 outputs are compared, and tiny real SGLang models on CUDA."""

from __future__ import annotations

import pytest
import torch

# Relative Frobenius error. One bf16 op lands between 1e-3 and 1e-2; through 27-32 random-weight layers
# the batch-shape-dependent GEMM rounding of batched vs single forwards accumulates to ~3e-2 (seen on
# an H100 for Qwen2.5-VL). Misrouted or unmasked outputs give O(1); the exact (1e-5) proofs are the
# fp32 CPU tests in test_towers_cpu.py.
BF16_TOL = 5e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tiny(name: str):
    """The tiny real SGLang model from tests/integration (built on CPU, then moved; that folder on sys.path)."""
    import sglang_models

    try:
        return sglang_models.BUILDERS[name]()
    except Exception as exc:  # a CUDA host may pick vision kernels that need sgl_kernel at construction
        pytest.skip(f"tiny {name} cannot be built on this host: {type(exc).__name__}: {exc}")


def tiny_on_cuda(name: str, attention: str = "triton_attn"):
    """The tiny model on CUDA, runnable without sgl_kernel's kernels: SGLang's triton vision attention (what the
    real-server harness runs; on an H200 SGLang picks fa3, an sgl_kernel op), or with ``attention="sdpa"`` its SDPA
    one built as SigLIP builds it (``flatten_batch``), and, under the stand-in in tests/gpu/shims, the torch paths
    (``forward_native``) of SGLang's fused ops (RMSNorm, activations)."""
    import sgl_kernel
    import sglang_models
    from sglang.srt.layers.attention.vision import VisionTritonAttention

    if attention not in ("triton_attn", "sdpa"):
        raise ValueError(f"attention must be triton_attn or sdpa, got {attention!r}")
    model = tiny(name)
    stand_in = "stand-in" in getattr(sgl_kernel, "__version__", "")
    for module in model.modules():
        if hasattr(module, "qkv_backend"):
            if attention == "triton_attn":
                module.qkv_backend = VisionTritonAttention()
                continue
            module.qkv_backend = sglang_models.sdpa_attention(module, flatten_batch=True)
            if hasattr(module, "pass_strided_qkv"):  # 0.5.23 decides it for the backend it was built with
                module.pass_strided_qkv = False
        if stand_in and hasattr(module, "forward_native") and hasattr(module, "forward_cuda"):
            module.forward = module.forward_native
    return model.to("cuda")
