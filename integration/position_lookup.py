"""Gemma 4's patch position embeddings as the table lookup SGLang's one-hot product computes.

SGLang's ``Gemma4VisionPatchEmbedder._position_embeddings`` (0.5.16 to 0.5.23) builds
``F.one_hot(positions, position_embedding_size)``: an int64 tensor of ``[batch, P, 2, 10240]`` on the E2B/E4B, 164 KB a
patch (413 MB for one 2,520-patch image), copies it to the table's dtype (41 KB a patch more) and multiplies it by the
``[2, 10240, 768]`` table. Each row of that product has a single 1, so each result is exactly one table row (the other
terms are exact zeros, whatever the order or precision of the sum), and SGLang then adds the x and y rows. Looking the
rows up gives the same values bit for bit, without the one-hot. That one-hot is most of what the coalescer measured a
Gemma 4 patch to need (``bytes_per_patch: auto``: 270,446 bytes on the E4B, so a 2 GiB budget held 3 images a
forward, README point 4), and of what its CUDA graphs' pool holds; vLLM users hit the same buffer as an OOM
(configs/gemma4.yaml).

Applied to the model's vision modules when the plugin starts, before the budget is calibrated, so SGLang's own method
(inline and fallback calls) gets it too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def look_up_positions(model: nn.Module) -> int:
    """Replace ``_position_embeddings`` of every Gemma 4 patch embedder in ``model``; how many were replaced now."""
    from sglang.srt.models.gemma4_vision import Gemma4VisionPatchEmbedder

    replaced = 0
    for module in model.modules():
        if isinstance(module, Gemma4VisionPatchEmbedder) and not hasattr(module._position_embeddings, "looks_up"):
            module._position_embeddings = _looked_up(module)
            replaced += 1
    return replaced


def _looked_up(embedder: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def position_embeddings(patch_positions: torch.Tensor, padding_positions: torch.Tensor) -> torch.Tensor:
        """SGLang's ``one_hot(positions) @ table``, summed over x and y: each axis's table rows, summed as SGLang sums
        them (``sum(dim=1)`` of ``[batch, 2, P, hidden]``); padding patches get zeros."""
        clamped = patch_positions.clamp(min=0)
        table = embedder.position_embedding_table
        rows = torch.stack([table[axis][clamped[..., axis]] for axis in range(table.shape[0])], dim=1)
        return torch.where(padding_positions.unsqueeze(-1), 0.0, rows.sum(dim=1))

    position_embeddings.looks_up = True  # type: ignore[attr-defined]
    return position_embeddings
