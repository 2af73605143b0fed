"""SGLang 0.5.23's move of every item's feature to the vision tower's device, backported to 0.5.16 for one
compared server (serve.py variant ``off+tok4ipc+backport``, plugin off).

0.5.16's Qwen3-VL ``get_image_feature`` / ``get_video_feature`` concatenate ``item.feature`` where they find it.
With ``--mm-feature-transport cuda_ipc`` one prefill batch held features on cuda:0 beside features on the CPU,
``torch.cat`` raised and the scheduler died (real server, c704fd5 and e12f02a), so SGLang's preprocessing flags
could not be measured without the plugin. 0.5.23 moves every item to the tower's device first
(``_materialize_visual_items``); this does it only when a call's features are on more than one device, so every
other call runs exactly as 0.5.16's. ``sitecustomize`` in this folder installs it in every process of a server
whose PYTHONPATH holds the folder and ``GPU_SERVE_PATCHES`` names it; the class is patched when SGLang imports the
module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from on_import import on_import

# module -> (class, methods); Qwen3-VL-MoE's class subclasses Qwen3-VL's and inherits the patch.
TARGETS = {"sglang.srt.models.qwen3_vl": ("Qwen3VLForConditionalGeneration",
                                          ("get_image_feature", "get_video_feature"))}


def on_tower_device(method: Callable[[Any, list], Any]) -> Callable[[Any, list], Any]:
    """``method`` with its items' tensor features moved to ``self.visual.device`` when they are on several."""
    def wrapper(model: Any, items: list) -> Any:
        import torch  # loaded by then; not at start-up, where every process of the server runs this file

        devices = {item.feature.device for item in items if isinstance(item.feature, torch.Tensor)}
        if len(devices) > 1:
            device = model.visual.device
            for item in items:
                if isinstance(item.feature, torch.Tensor) and item.feature.device != device:
                    item.feature = item.feature.to(device, non_blocking=True)
        return method(model, items)

    wrapper.__name__, wrapper.__qualname__, wrapper.__wrapped__ = method.__name__, method.__qualname__, method
    return wrapper


def patch(module: Any) -> None:
    class_name, methods = TARGETS[module.__name__]
    cls = getattr(module, class_name)
    for name in methods:
        if hasattr(cls, name):
            setattr(cls, name, on_tower_device(getattr(cls, name)))


def install() -> None:
    for module in TARGETS:
        on_import(module, patch)
