"""Real vision towers (transformers models, random weights) behind the :class:`~mm_scheduler.Tower` protocol.

``build_tower(name, device)`` is the one entry point the CLI and benchmarks use, so a new tower is
one registry line. transformers is imported only when a tower is built: the core stays usable
without it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..types import Tower

MIXED_RESOLUTIONS = (224, 336, 384, 448, 512)
"""SigLIP input sizes served by ``siglip-mixed``: 256, 576, 729, 1024 and 1296 patches."""


def _siglip(device: str, **kw: object) -> Tower:
    from .siglip import SiglipTower

    return SiglipTower(device, **kw)


def _siglip_mixed(device: str, **kw: object) -> Tower:
    from .siglip import SiglipTower

    if kw.get("tiny"):
        kw.setdefault("resolutions", (28, 56, 84))
    kw.setdefault("resolutions", MIXED_RESOLUTIONS)
    return SiglipTower(device, **kw)


def _qwen2_5_vl(device: str, **kw: object) -> Tower:
    from .qwen2_5_vl import Qwen25VLTower

    return Qwen25VLTower(device, **kw)


TOWERS: dict[str, Callable[..., Tower]] = {
    "siglip": _siglip,
    "siglip-mixed": _siglip_mixed,
    "qwen2_5_vl": _qwen2_5_vl,
}


def build_tower(name: str, device: str | torch.device = "cuda", **kw: object) -> Tower:
    """Build tower ``name`` on ``device``; ``tiny=True``: small config for CPU tests; ``dtype=``: not bf16."""
    try:
        factory = TOWERS[name]
    except KeyError:
        raise ValueError(f"unknown tower {name!r}; choose one of {sorted(TOWERS)}") from None
    return factory(str(device), **kw)


__all__ = ["MIXED_RESOLUTIONS", "TOWERS", "build_tower"]
