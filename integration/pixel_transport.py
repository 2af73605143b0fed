"""``sglang.uint8_pixels``: image pixels leave the tokenizer manager as uint8, and become float32 where they are used.

SGLang's tokenizer manager hands each image's ``pixel_values`` to the scheduler as float32: on one node through
``/dev/shm`` (``ShmPointerMMData``: a copy into a fresh segment per image, and on 0.5.16 a copy out of it in the
scheduler), across nodes pickled. On
Gemma 4 an image is 2,520 patches x 768 float32 values, 7.7 MB, and on a GPU server the processor's output comes
back from the GPU first (``.to("cpu")``). Gemma 4's image processor does not normalize: its float32 output is the
resized uint8 image times its rescale factor 1/255, so the uint8 image carries every bit of it in a quarter of the
bytes. With this setting the tokenizer manager's HF image processor skips the multiply (``do_rescale`` off), and the
scheduler does it (:func:`widen`) as the processor did, a float32 multiply, bit for bit: on the GPU where the
plugin stages a batch or hands items to SGLang's own method, on the CPU at arrival in a scheduler without the
plugin's service.

Only where that is lossless and the scheduler's side is known to widen: SGLang's CPU feature transport (not
``cuda_ipc``), its fast (torch) image processor, SGLang's own processor of a model whose adapter widens
(:data:`ARCHITECTURES`, :data:`PROCESSORS`), schedulers that load plugins (not ``--use-ray``), no
``--mm-process-config`` image setting of the rescale, and a probe image that comes out uint8 and widens to the
processor's float32 output bit for bit at start-up (a processor that normalizes, or rescales by another factor, does
not). Otherwise one log line says why, and nothing changes. The scheduler widens only with the setting on and such a
model (``sglang_plugin``): other models' uint8 features (SGLang 0.5.23's Kimi-K3 sends raw uint8 on purpose) are
left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SCALE = 1 / 255
"""The rescale factor the narrowed processor would have applied: the one ``uint8`` pixels are widened by."""
ARCHITECTURES = ("Gemma4ForConditionalGeneration",)
"""Models whose adapter stages image pixels through ``adapters.stack_on``, which widens uint8 pixels (the class name
of SGLang's own model, which the scheduler checks, and the architecture the tokenizer manager reads)."""
PROCESSORS = ("Gemma4SGLangProcessor",)
"""SGLang's own processors of those models: with ``--model-impl transformers`` SGLang serves the same architecture
through transformers' model, whose vision code the plugin does not route, so its pixels must stay float32."""


def widen(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` as the processor would have sent them: uint8 becomes float32 times :data:`SCALE`, on its device.

    ``x.to(float32) * SCALE`` is the multiply the processor does (``uint8 * rescale_factor`` in float32), so the
    result is bit-identical; other dtypes are returned unchanged."""
    return pixels.to(torch.float32) * SCALE if pixels.dtype == torch.uint8 else pixels


def widen_items(items: Sequence[Any], device: torch.device | None = None) -> None:
    """Widen, in place, the uint8 pixel features of ``items`` (after a copy to ``device`` when one is given)."""
    for item in items:
        feature = getattr(item, "feature", None)  # None for a None item (SGLang's lists may hold them)
        if isinstance(feature, torch.Tensor) and feature.dtype == torch.uint8:
            item.feature = widen(feature if device is None else feature.to(device, non_blocking=True))


_RESCALE_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


def narrow_images(mm_processor: Any) -> str | None:
    """In the tokenizer manager, before any request: ask SGLang's HF image processor for uint8 pixels.

    Returns None when it now sends uint8, else why not (the processor is left as it was)."""
    transport = mm_processor.mm_feature_transport
    if transport != "cpu" or getattr(mm_processor, "keep_mm_feature_on_device", False):  # the flag: 0.5.16 only
        return f"features stay on the GPU (--mm-feature-transport {transport} or --keep-mm-feature-on-device)"
    if mm_processor.disable_fast_image_processor:
        return "SGLang runs the PIL image processor (--disable-fast-image-processor)"
    architectures = mm_processor.hf_config.architectures or []
    if not set(architectures) & set(ARCHITECTURES):
        return f"{architectures} is not one of {list(ARCHITECTURES)}, whose adapters widen uint8 pixels"
    if type(mm_processor).__name__ not in PROCESSORS:
        return f"{type(mm_processor).__name__} is not SGLang's own processor of the model (--model-impl transformers?)"
    if getattr(mm_processor.server_args, "use_ray", False):  # its scheduler actors load no plugins to widen them
        return "SGLang's schedulers run as Ray actors (--use-ray), which load no plugins"
    from sglang.srt.environ import envs

    # The scheduler would copy uint8 pixels into its float32 buffer (0-255) before the plugin sees them (0.5.16
    # schedule_batch: try_add_to_buffer), and the plugin widens only what is still uint8.
    if envs.SGLANG_MM_BUFFER_SIZE_MB.get() > 0:
        return "SGLANG_MM_BUFFER_SIZE_MB copies features into SGLang's float32 buffer before they could be widened"
    # SGLang passes --mm-process-config's image settings with every call, over the processor's own
    overridden = sorted(set(mm_processor.image_config) & set(_RESCALE_KEYS))
    if overridden:
        return f"--mm-process-config sets {overridden} for every image"
    return _narrow_if_lossless(mm_processor._processor.image_processor, dict(mm_processor.image_config))


def _narrow_if_lossless(images: Any, image_config: dict[str, Any]) -> str | None:
    """Turn ``images``' rescale off if a probe image then comes out uint8 and widens to its float32 output bit for
    bit (what a processor that normalizes, or rescales by another factor, fails); else leave it on and say why."""
    from PIL import Image

    if not images.do_rescale:
        return f"{type(images).__name__} does not rescale"
    generator = torch.Generator().manual_seed(0)
    probe = Image.fromarray(torch.randint(0, 256, (70, 50, 3), dtype=torch.uint8, generator=generator).numpy())
    problem = None
    try:
        wide = images(images=[probe], return_tensors="pt", device="cpu", **image_config)["pixel_values"]
        images.do_rescale = False
        narrow = images(images=[probe], return_tensors="pt", device="cpu", **image_config)["pixel_values"]
        if narrow.dtype != torch.uint8:
            problem = f"{type(images).__name__} without rescaling gives {narrow.dtype}, not uint8"
        elif not torch.equal(widen(narrow), wide):
            problem = f"{type(images).__name__}'s uint8 output does not widen to its float32 output bit for bit"
    except Exception as exc:
        problem = f"{type(images).__name__} failed on a probe image ({type(exc).__name__}: {exc})"
    if problem is not None:
        images.do_rescale = True
    return problem
