"""Host-to-device staging shared by the tower adapters.

Why a helper: every adapter must move pixels the same careful way. Each unit is copied straight
from (pinned) host memory into its slice of one device buffer with ``non_blocking=True`` on the
*current* stream (the executor's dedicated stream), so no host-side memcpy into a staging batch
and no host-wide sync. Pageable host tensors are pinned first (the pinned copy comes from
PyTorch's caching host allocator, which keeps it alive until the copy has run). CUDA inputs made
on another stream are marked with ``record_stream`` so their memory is not reused while this
stream still reads it. Outputs are marked for the stream that will consume them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..executor import own_storage


def resolve_device(device: str | torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: an explicit index is what ``torch.cuda.set_device`` and events need."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def stage(tensors: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype, *,
          concat: bool = False) -> torch.Tensor:
    """Copy ``tensors`` into one new device tensor: stacked on a new dim 0, or concatenated on dim 0."""
    first = tensors[0]
    if concat:
        rows = [t.shape[0] for t in tensors]
        out = torch.empty((sum(rows), *first.shape[1:]), device=device, dtype=dtype)
        slices = torch.split(out, rows, dim=0)
    else:
        out = torch.empty((len(tensors), *first.shape), device=device, dtype=dtype)
        slices = out.unbind(0)
    on_cuda = device.type == "cuda"
    stream = torch.cuda.current_stream(device) if on_cuda else None
    for dst, src in zip(slices, tensors, strict=True):
        if on_cuda and src.device.type == "cpu":
            if not src.is_pinned():
                src = src.pin_memory()
            if src.dtype != dtype:  # convert on the GPU: a cross-dtype copy from the host converts on the CPU
                src = src.to(device, non_blocking=True)
            dst.copy_(src, non_blocking=True)
        else:
            if stream is not None and src.device.type == "cuda":
                src.record_stream(stream)
            dst.copy_(src)
    return out


def hand_off(output: torch.Tensor, consumer: torch.cuda.Stream | None) -> None:
    """Keep ``output``'s memory from being reused by the encode stream while ``consumer`` may still read it.

    The executor hands outputs over once its completion event has fired, but the consumer's own
    kernels that read them are asynchronous: without this, freeing an output on the consumer side
    lets the next forward on the encode stream overwrite it before those kernels ran.
    """
    if consumer is None or output.device.type != "cuda":
        return
    if torch.cuda.current_stream(output.device) != consumer:
        output.record_stream(consumer)


def handed_off(parts: Sequence[torch.Tensor], consumer: torch.cuda.Stream | None) -> list[torch.Tensor]:
    """One output per unit from views of one batch buffer, each :func:`hand_off` to ``consumer``.

    The executor's :func:`~mm_scheduler.executor.own_storage` copies a CUDA view of a larger buffer out, so it
    is applied here first: those copies, not the batch buffer, are what the consumer reads and frees.
    """
    outputs = [own_storage(part) for part in parts]
    for output in outputs:
        hand_off(output, consumer)
    return outputs  # type: ignore[return-value]
