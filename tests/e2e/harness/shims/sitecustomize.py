"""Loaded by every Python process of the e2e tests (this folder is put first on PYTHONPATH).

Two test-harness shims for SGLang's CPU path on a machine without CUDA (listed in tests/e2e docstrings):

* ``torch.ops.sgl_kernel``: some SGLang modules bind CPU kernels of that namespace when they are
  imported (``models/qwen3_5.py``, reached via ``multimodal/processors/qwen_vl.py``). Only the names
  below resolve, to functions that raise if called; every other name stays absent, so
  ``register_fake_if_exists`` and the AMX check (``convert_weight_packed``) behave as without the ops.
* ``Tensor.pin_memory``: needs a CUDA driver; SGLang's Qwen video preprocessing calls it. Without
  CUDA it returns the tensor itself (pinning only speeds up host-to-device copies).
"""

import torch
from torch._ops import _OpNamespace

_IMPORT_TIME_OPS = frozenset({
    "fused_sigmoid_mul_cpu", "fused_qk_gemma_rmsnorm_cpu", "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu", "fused_gdn_gating_cpu", "fused_moe_router_cpu",
    "rmsnorm_cpu", "fused_dual_residual_rmsnorm_cpu", "fused_input_proj_cpu",
})


def _stand_in(name):
    def not_available(*args, **kwargs):
        raise RuntimeError(f"torch.ops.sgl_kernel.{name} is a test-harness stand-in and was called")

    not_available.__name__ = name
    return not_available


class _ImportTimeNames(_OpNamespace):
    def __getattr__(self, op_name):
        try:
            return super().__getattr__(op_name)
        except AttributeError:
            if op_name not in _IMPORT_TIME_OPS:
                raise
            return _stand_in(op_name)


if not torch.cuda.is_available():
    torch.ops.sgl_kernel = _ImportTimeNames("sgl_kernel")
    _original_pin_memory = torch.Tensor.pin_memory

    def _pin_memory_without_cuda(self, *args, **kwargs):
        return self

    torch.Tensor.pin_memory = _pin_memory_without_cuda
