"""A vision encoder that costs nothing, for one plugin-off server (serve.py variants ``off+freeenc``,
``off+tok4ipc+freeenc``): the floor any encoder scheduling can reach, measured in the same harness run.

Why: issue 17 asks for a seed TTFT median of 0.60x plugin-off. Where a server with a free encoder cannot get there,
no batching, graph or head start can, and the miss has a measured cause. Everything else stays SGLang's own: the
tokenizer manager's preprocessing, the feature transport, the scheduler and the LLM's prefills and decodes.

SGLang's model methods ``get_image_feature`` / ``get_video_feature`` return the embeddings of a call's items, one
row per placeholder token. Each method's first call runs for real; its output gives the row width, dtype and device
(and Gemma3's per-crop layout), and must have one row per placeholder token of the items' ``offsets`` (inclusive
spans in 0.5.16: SGLang counts ``end - start + 1`` itself). Every later call returns zeros of that shape without
touching the tower (one log line says so). What it removes is whatever runs inside the method: the tower, and for
Qwen3-VL also the features' move to the GPU and their concatenation (SGLang skips its own pre-embed move for the
methods that do it themselves, ``_can_skip_pre_embed_feature_move``); for Qwen2.5-VL and the Gemmas that move runs
before the method and stays. A method whose first output does not match the offsets keeps running for
real, and says so once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from on_import import on_import

logger = logging.getLogger(__name__)

TARGETS = {
    "sglang.srt.models.qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "sglang.srt.models.qwen3_vl": "Qwen3VLForConditionalGeneration",
    "sglang.srt.models.gemma3_mm": "Gemma3ForConditionalGeneration",
    "sglang.srt.models.gemma4_mm": "Gemma4ForConditionalGeneration",
}
METHODS = ("get_image_feature", "get_video_feature")


def placeholder_rows(items: list) -> int:
    """Placeholder tokens of ``items``: the rows SGLang expects from the embedding method."""
    return sum(end - start + 1 for item in items for start, end in item.offsets)


def free(method: Callable[[Any, list], Any]) -> Callable[[Any, list], Any]:
    """``method`` run once for real, then replaced by zeros of the shape it returned."""
    learned: dict[str, Any] = {}  # "shape": (inner dims, dtype, device), or "real": the first call did not match

    def wrapper(model: Any, items: list) -> Any:
        rows = placeholder_rows(items)
        if "shape" in learned:
            import torch

            inner, dtype, device = learned["shape"]
            per_leading = math.prod(inner[:-1])
            if rows % per_leading == 0:
                return torch.zeros((rows // per_leading, *inner), dtype=dtype, device=device)
            if "uneven" not in learned:
                learned["uneven"] = True
                logger.warning("free encoder: %s got %d placeholder tokens, not a multiple of %d; such calls run the "
                               "tower", method.__qualname__, rows, per_leading)
        out = method(model, items)
        if not learned:
            produced = math.prod(out.shape[:-1])
            if produced == rows:
                learned["shape"] = (tuple(out.shape[1:]), out.dtype, out.device)
                logger.warning("free encoder: %s returns zeros of [rows, %s] %s from now on, without the tower",
                               method.__qualname__, ", ".join(map(str, out.shape[1:])), out.dtype)
            else:
                learned["real"] = True
                logger.warning("free encoder: %s returned %d rows for %d placeholder tokens; it keeps running for "
                               "real", method.__qualname__, produced, rows)
        return out

    wrapper.__name__, wrapper.__qualname__, wrapper.__wrapped__ = method.__name__, method.__qualname__, method
    return wrapper


def patch(module: Any) -> None:
    cls = getattr(module, TARGETS[module.__name__])
    for name in METHODS:
        if name in vars(cls):
            setattr(cls, name, free(vars(cls)[name]))


def install() -> None:
    for module in TARGETS:
        on_import(module, patch)
