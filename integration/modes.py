"""Which encoder backend is safe for a scheduler process: ``async`` (coalescer) or ``lockstep``.

What SGLang 0.5.23 does with TP>1 (read in its source):

* Without ``--mm-enable-dp-encoder`` the vision tower is TP-sharded: ``VisionAttention`` splits heads
  over the attention-TP group and Qwen2.5-VL's MLP is column/row-parallel over ``tp``
  (``models/qwen2_5_vl.py``, ``layers/attention/vision.py``), so every forward all-reduces. Ranks must
  issue identical forwards in the same order: only ``lockstep`` does that; ``async`` could hang.
* With it, models that honour the flag (``model.use_data_parallel``, e.g. Qwen2.5-VL, Qwen3-VL; not
  Gemma3/Gemma4) build the tower *replicated* (``parallel_group="replicated"``): the tower itself has no
  collective. SGLang's own ``get_*_feature`` then splits the images over the ranks and gathers the
  embeddings (``run_dp_sharded_mrope_vision_model``: ``attn_tp_group.broadcast`` for one image, else
  ``all_gather`` of a batch-dependent padded length). So ``async`` is safe there only when the tower
  adapter calls the replicated tower directly (``model.visual(pixels, grid_thw=...)``), never the
  sharded ``get_*_feature``: then each rank encodes every item itself, with no collective, and the
  model's logits are all-gathered before sampling so ranks still pick the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MODES = ("auto", "async", "lockstep")


def choose_mode(requested: str, tp_size: int, dp_encoder: bool) -> str:
    """The backend to run: ``"async"`` or ``"lockstep"``.

    ``requested`` is the user's ``auto`` / ``async`` / ``lockstep``. ``dp_encoder`` must be True only when
    the tower's weights are replicated on every rank *and* the adapter's forward issues no collective
    (see the module docstring); then a collective-free tower makes ``async`` safe at any TP size.
    A TP-sharded tower (TP>1, no DP encoder) always gets ``lockstep``, whatever was requested.
    """
    if requested not in MODES:
        raise ValueError(f"mode {requested!r}: expected one of {list(MODES)}")
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if requested == "lockstep":
        return "lockstep"
    if tp_size > 1 and not dp_encoder:
        return "lockstep"
    return "async"


def encoder_is_data_parallel(model: Any) -> bool:
    """True when SGLang built ``model``'s tower replicated (``--mm-enable-dp-encoder`` honoured)."""
    return bool(getattr(model, "use_data_parallel", False))


def tp_agreement(scheduler: Any) -> Callable[[bool], bool]:
    """Lockstep failure agreement over the scheduler's attention-TP CPU (gloo) group.

    Those are the ranks that receive the same requests and share the tower's collectives (without
    DP attention it is the whole TP group); a CPU group keeps the flag off the NCCL streams.
    """
    from mm_scheduler.lockstep import process_group_agree

    return process_group_agree(scheduler.attn_tp_cpu_group)
