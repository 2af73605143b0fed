"""Tell SGLang's triton vision attention the longest segment of a uniform batch, so it stops asking the GPU.

SigLIP (Gemma3) and Gemma 4's vision tower call ``VisionTritonAttention.forward`` with ``cu_seqlens=None``: every
image is one segment of ``seq_len`` rows. The backend then builds ``cu_seqlens`` for that shape and, given no
``max_seqlen``, reads the longest segment back from the GPU (``resolve_precomputed_max_seqlen``:
``int(seq_lens.max().item())``) in every layer, 27 host-device round trips a SigLIP forward and 16 a Gemma 4 one.
SGLang's own docstring there says why that hurts ("synchronizes the launch stream") and its packed towers
(Qwen) pass the value. For ``cu_seqlens=None`` it is ``seq_len`` exactly (the segments are ``arange(0, (bsz + 1) *
seq_len, seq_len)``), so passing it changes no kernel argument; it only lets the host queue the next layers
while the GPU runs. In the real server, Gemma 4's coalescer forwards spent 31-39 ms of a 32-40 ms forward on the
host, holding 1.5 images of ~1 TFLOP each (README, point 4).

Applied to the model's vision modules when the plugin starts, so SGLang's own method (inline and fallback calls)
gets it too. Calls that pass ``cu_seqlens``, ``forward_metadata`` or ``max_seqlen`` are left as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn


def pass_uniform_max_seqlen(model: nn.Module) -> int:
    """Wrap the ``forward`` of every ``VisionTritonAttention`` in ``model``; returns how many were wrapped now."""
    from sglang.srt.layers.attention.vision import VisionTritonAttention

    wrapped = 0
    for module in model.modules():
        if isinstance(module, VisionTritonAttention) and not hasattr(module.forward, "passes_uniform_max_seqlen"):
            module.forward = _with_uniform_max_seqlen(module.forward)
            wrapped += 1
    return wrapped


def _with_uniform_max_seqlen(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        if (kwargs.get("cu_seqlens") is None and kwargs.get("forward_metadata") is None
                and kwargs.get("max_seqlen") is None and isinstance(kwargs.get("seq_len"), int)):
            kwargs["max_seqlen"] = kwargs["seq_len"]
        return forward(*args, **kwargs)

    call.passes_uniform_max_seqlen = True  # type: ignore[attr-defined]
    return call
