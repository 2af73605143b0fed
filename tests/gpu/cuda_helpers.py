"""What the CUDA tower tests share: how bf16 outputs are compared."""

from __future__ import annotations

import torch

# Relative Frobenius error. One bf16 op lands between 1e-3 and 1e-2; through 27-32 random-weight layers
# the batch-shape-dependent GEMM rounding of batched vs single forwards accumulates to ~3e-2 (seen on
# an H100 for Qwen2.5-VL). Misrouted or unmasked outputs give O(1); the exact (1e-5) proofs are the
# fp32 CPU tests in test_towers_cpu.py.
BF16_TOL = 5e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
