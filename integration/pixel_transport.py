"""``sglang.uint8_pixels``: image pixels leave the tokenizer manager as uint8, and become float32 where they are used.

SGLang's tokenizer manager hands each image's ``pixel_values`` to the scheduler as float32: on one node through
``/dev/shm`` (``ShmPointerMMData``: a copy into a fresh segment per image, and on 0.5.16 a copy out of it in the
scheduler), across nodes pickled, and the scheduler SHA-256s every byte for its cache key (0.5.16 ``tensor_hash``,
on its main thread). On a GPU server the processor's output also comes back from the GPU first (``.to("cpu")``).
An image processor's float32 output is its resized uint8 image rescaled (times 1/255), and normalized for most
models (``(x - mean) / std`` per channel; transformers' fast processors fuse both into ``(x - 255 mean) /
(255 std)``), then laid out (Qwen's flattened patches): every bit of it is in the uint8 image, a quarter of the bytes.
With this setting the tokenizer manager's HF image processor skips the rescale and the normalize, and the scheduler
redoes them (:class:`Widening`, read from its own copy of the same processor) with the same float32 operations, bit
for bit: on the GPU where the plugin stages a batch or hands items to SGLang's own method, on the CPU at arrival
in a scheduler without the plugin's service.

Only where that is lossless and the scheduler's side is known to widen: SGLang's CPU feature transport (not
``cuda_ipc``), its fast (torch) image processor, SGLang's own processor of a model whose adapter widens
(:data:`ARCHITECTURES`, :data:`PROCESSORS`), schedulers that load plugins (not ``--use-ray``) and an image processor
(not ``--skip-tokenizer-init``), no ``--mm-process-config`` image setting of the rescale or normalize, and a probe
image that comes out uint8 and widens to the processor's float32 output bit for bit at start-up (a processor that
normalizes in another order or layout does not). Otherwise one log line says why, and nothing changes. The
scheduler widens only with the setting on and such a model (``sglang_plugin``): other models' uint8 features
(SGLang 0.5.23's Kimi-K3 sends raw uint8 on purpose) are left alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import sglang_compat

ARCHITECTURES = ("Gemma4ForConditionalGeneration", "Gemma3ForConditionalGeneration",
                 "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                 "Qwen3VLMoeForConditionalGeneration")
"""Models whose adapter widens uint8 image pixels wherever they reach the tower (the class name of SGLang's own
model, which the scheduler checks, and the architecture the tokenizer manager reads)."""
PROCESSORS = ("Gemma4SGLangProcessor", "Gemma3SGLangImageProcessor", "QwenVLImageProcessor")
"""SGLang's own processors of those models. With ``--model-impl transformers`` SGLang serves the same architecture
through transformers' model, whose vision code the plugin does not route, so its pixels must stay float32: Gemma's
processors are then replaced by SGLang's ``TransformersAutoMultimodalProcessor``, but Qwen's serves that backend too
(``supports_transformers_backend``), so the setting itself is checked as well."""


@dataclass(frozen=True)
class Widening:
    """What an image processor does to its uint8 pixels after resizing them, redone by the scheduler.

    ``x * scale`` (the rescale alone), or with ``mean`` and ``std`` (per channel) the fused rescale-and-normalize of
    transformers' fast processors: ``(x - m) / s`` in float32, with ``m = float32(mean) * (1 / scale)`` and ``s``
    alike. The channel is the third dimension from the end of an image tensor (``[..., C, H, W]``), or the slowest
    part of a flattened patch (Qwen's ``[patches, C * temporal * patch * patch]``)."""

    scale: float
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def of(cls, images: Any) -> Widening | None:
        """The widening of a HF image processor's settings; None when it does not rescale (nothing to redo)."""
        if not getattr(images, "do_rescale", False):
            return None
        if not getattr(images, "do_normalize", False):
            return cls(float(images.rescale_factor))
        return cls(float(images.rescale_factor), _per_channel(images.image_mean), _per_channel(images.image_std))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` as the processor would have sent them, on their device; other dtypes are returned unchanged."""
        if pixels.dtype != torch.uint8:
            return pixels
        wide = pixels.to(torch.float32)
        if self.mean is None or self.std is None:
            return wide * self.scale  # the processor's multiply: uint8 * rescale_factor, in float32
        mean, std = _normalizers(self, wide.device)
        if wide.dim() >= 3:
            if len(self.mean) not in (1, wide.shape[-3]):  # e.g. channel-last patches [B, P, p*p*C]: another layout
                raise ValueError(f"uint8 pixels of shape {tuple(wide.shape)} are not [..., C, H, W] with "
                                 f"C = {len(self.mean)}, the layout a normalizing widening knows")
            return (wide - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        if wide.dim() != 2 or wide.shape[-1] % len(self.mean):
            raise ValueError(f"uint8 pixels of shape {tuple(wide.shape)} are not flattened patches "
                             f"[patches, C * ...] with C = {len(self.mean)}")
        channels = wide.reshape(wide.shape[0], len(self.mean), -1)
        return ((channels - mean.view(-1, 1)) / std.view(-1, 1)).reshape(pixels.shape)


def _per_channel(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),)


@functools.lru_cache(maxsize=16)
def _normalizers(widening: Widening, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused mean and std on ``device``, computed as the processor computes them, once per device: a copy of a
    pageable host tensor to the GPU waits for the copying stream, which must not happen per batch."""
    fused = 1.0 / widening.scale
    mean, std = (torch.tensor(values, dtype=torch.float32) * fused for values in (widening.mean, widening.std))
    return mean.to(device), std.to(device)


def widen_items(items: Sequence[Any], widening: Widening | None, device: torch.device | None = None) -> None:
    """Widen, in place, the uint8 pixel features of ``items`` (after a copy to ``device`` when one is given); with no
    ``widening`` (the setting off, or another model) nothing is touched."""
    if widening is None:
        return
    for item in items:
        feature = getattr(item, "feature", None)  # None for a None item (SGLang's lists may hold them)
        if isinstance(feature, torch.Tensor) and feature.dtype == torch.uint8:
            item.feature = widening(feature if device is None else feature.to(device, non_blocking=True))


_RESCALE_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")


def narrow_images(mm_processor: Any) -> str | None:
    """In the tokenizer manager, before any request: ask SGLang's HF image processor for uint8 pixels.

    Returns None when it now sends uint8, else why not (the processor is left as it was)."""
    if flags := sglang_compat.features_kept_on_gpu(mm_processor):
        return f"features stay on the GPU ({flags})"
    if mm_processor.disable_fast_image_processor:
        return "SGLang runs the PIL image processor (--disable-fast-image-processor)"
    architectures = mm_processor.hf_config.architectures or []
    if not set(architectures) & set(ARCHITECTURES):
        return f"{architectures} is not one of {list(ARCHITECTURES)}, whose adapters widen uint8 pixels"
    if type(mm_processor).__name__ not in PROCESSORS:
        return f"{type(mm_processor).__name__} is not SGLang's own processor of the model (--model-impl transformers?)"
    model_impl = getattr(mm_processor.server_args, "model_impl", "auto")
    model_impl = str(getattr(model_impl, "value", model_impl)).lower()  # a str, or SGLang's ModelImpl enum
    if model_impl not in ("auto", "sglang"):  # "auto" is SGLang's own model for every one of ARCHITECTURES
        return f"SGLang serves the model through --model-impl {model_impl}, whose vision code the plugin does not route"
    if getattr(mm_processor.server_args, "use_ray", False):  # its scheduler actors load no plugins to widen them
        return "SGLang's schedulers run as Ray actors (--use-ray), which load no plugins"
    if getattr(mm_processor.server_args, "skip_tokenizer_init", False):  # the scheduler reads its Widening there
        return "SGLang's schedulers load no image processor to widen by (--skip-tokenizer-init)"
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
    """Turn ``images``' rescale and normalize off if a probe image then comes out uint8 and its :class:`Widening`
    gives the float32 output back bit for bit; else leave both as they were and say why."""
    from PIL import Image

    widening = Widening.of(images)
    if widening is None:
        return f"{type(images).__name__} does not rescale"
    generator = torch.Generator().manual_seed(0)
    probe = Image.fromarray(torch.randint(0, 256, (70, 50, 3), dtype=torch.uint8, generator=generator).numpy())
    normalizes, problem = widening.mean is not None, None
    try:
        wide = images(images=[probe], return_tensors="pt", device="cpu", **image_config)["pixel_values"]
        images.do_rescale = False
        if normalizes:
            images.do_normalize = False
        narrow = images(images=[probe], return_tensors="pt", device="cpu", **image_config)["pixel_values"]
        if narrow.dtype != torch.uint8:
            problem = f"{type(images).__name__} without rescaling gives {narrow.dtype}, not uint8"
        elif not torch.equal(widening(narrow), wide):
            problem = f"{type(images).__name__}'s uint8 output does not widen to its float32 output bit for bit"
    except Exception as exc:
        problem = f"{type(images).__name__} failed on a probe image ({type(exc).__name__}: {exc})"
    if problem is not None:
        images.do_rescale = True
        if normalizes:
            images.do_normalize = True
    return problem
