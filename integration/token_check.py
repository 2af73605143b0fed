"""``sglang.fast_mm_token_check``: transformers' multimodal-token check as transformers 5.17 does it, in the
tokenizer manager of an SGLang that pins an older transformers.

An HF processor call of a VLM ends in ``ProcessorMixin._check_special_mm_tokens``, which counts each modality's
token in ``input_ids`` to catch a truncated prompt (a few processors override it: Aya Vision's, and from
transformers 5.19 Gemma3's, whose own form still iterates the tensor, ~4.6 ms a six-image request; not replaced).
Before transformers 5.17 (huggingface/transformers#47580) it counts with ``list(ids).count(token_id)`` on the rows
of the ``input_ids`` tensor: a 0-d tensor per token and a tensor comparison per element, 8-13 ms a six-image
request of Qwen2.5-VL, Qwen3-VL or Gemma 4 (``benchmarks/token_check.py``), on the tokenizer manager's main thread,
where SGLang runs the processor. SGLang 0.5.16-0.5.21 pin transformers 5.12.1. transformers 5.17's check turns
``input_ids`` into lists once: the same counts, the same error.
"""

from __future__ import annotations

import re
from typing import Any

FIXED_IN = (5, 17)
"""The first transformers release whose check counts lists (huggingface/transformers#47580)."""


def install() -> str | None:
    """Give transformers' ``ProcessorMixin`` the check of transformers 5.17 if its own iterates tensors.

    Returns None when installed (again, if it was), else why not. Process-wide and never undone: the tokenizer manager's
    process (an ``sglang.Engine``'s is the user's own); the same counts, so nothing else there changes."""
    from transformers import processing_utils

    mixin = processing_utils.ProcessorMixin
    version = transformers_version()
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) >= FIXED_IN:
        return f"transformers {version} has the check of 5.17 (huggingface/transformers#47580) already"
    if "_check_special_mm_tokens" not in mixin.__dict__:
        return f"transformers {version} has no ProcessorMixin._check_special_mm_tokens"
    mixin._check_special_mm_tokens = check_special_mm_tokens
    return None


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_special_mm_tokens(self: Any, text: list[str], text_inputs: Any, modalities: list[str]) -> None:
    """transformers 5.17's ``ProcessorMixin._check_special_mm_tokens``, line for line."""
    input_ids = text_inputs["input_ids"]
    if hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    for modality in modalities:
        token_str = getattr(self, f"{modality}_token", None)
        token_id = getattr(self, f"{modality}_token_id", None)
        if token_str is not None and token_id is not None:
            ids_count = [list(ids).count(token_id) for ids in input_ids]
            text_count = [sample.count(token_str) for sample in text]

            if ids_count != text_count:
                raise ValueError(
                    f"Mismatch in `{modality}` token count between text and `input_ids`. Got ids={ids_count} and "
                    f"text={text_count}. Likely due to `truncation='max_length'`. Please disable truncation or "
                    "increase `max_length`."
                )
