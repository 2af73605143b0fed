"""Towers that wrap an SGLang model's own vision encoder, so coalesced results equal the model's.

Each adapter turns one SGLang ``MultimodalDataItem`` into coalescer units (``EncodeItem``), runs
batches of units through the model's own modules, and reassembles one item's outputs into exactly
the tensor the model's ``get_image_feature`` / ``get_video_feature`` would have produced for it.

* Qwen2.5-VL / Qwen3-VL (``ragged``): a batch is one packed varlen forward with one ``grid_thw``
  row per unit, run through the model's unhooked ``get_*_feature``. Videos differ:
  Qwen3-VL splits a video into temporal slices ``(1, h, w)``, exact because its full attention is
  per slice (``token_cu_seqlens = repeat(h*w, t)`` in ``Qwen3VLMoeVisionModel.forward``) and its
  interpolated position embedding depends on ``(h, w)`` only. SGLang's Qwen2.5-VL tower is not
  sliceable: its full-attention ``cu_seqlens`` is the cumulative ``t*h*w`` of each grid row
  (``Qwen2_5_VisionTransformer.forward``), so every frame attends to the whole clip; a Qwen2.5-VL
  video is therefore one unit of ``t*h*w`` patches (splitting changed outputs by ~2% here).
* Gemma3 (uniform): SigLIP at a fixed resolution; units are single crops, stacked into one batch.
* Gemma4 (uniform per patch count): units are single images or video frames ``[P, patch_pixels]``
  with their position ids; one batch holds one ``P`` (padding patches carry position -1).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mm_scheduler import EncodeItem

logger = logging.getLogger(__name__)

# Names, not classes: importing every model module just to test isinstance would pull in all of them.
QWEN_CLASSES = ("Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")
GEMMA3_CLASSES = ("Gemma3ForConditionalGeneration",)
GEMMA4_CLASSES = ("Gemma4ForConditionalGeneration",)


def _modality_name(item: Any) -> str:
    return item.modality.name.lower()


def _model_device(model: nn.Module) -> torch.device:
    device = next(model.parameters()).device
    if device.type == "cuda" and device.index is None:  # the coalescer's forward thread selects it by index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _unhooked(model: nn.Module, name: str) -> Callable[..., Any]:
    """The model's own method, beneath any plugin wrapper (ours routes here, so must not recurse)."""
    return inspect.unwrap(getattr(type(model), name)).__get__(model)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SGLangTower:
    """Common part: which items an adapter takes, and the bookkeeping the coalescer needs."""

    ragged: bool
    bytes_per_patch: int
    modalities: tuple[str, ...] = ("image", "video")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = _model_device(model)

    def accepts(self, item: Any) -> bool:
        """True for raw pixel items of a supported modality (precomputed embeddings stay with SGLang)."""
        return (_modality_name(item) in self.modalities and isinstance(item.feature, torch.Tensor)
                and item.precomputed_embeddings is None and self._raw_pixels(item))

    def _raw_pixels(self, item: Any) -> bool:
        raise NotImplementedError

    def units(self, item: Any) -> list[EncodeItem]:
        """The coalescer units of one SGLang item; ``assemble`` undoes the split."""
        raise NotImplementedError

    def output_bytes(self, item: Any) -> int:
        """Bytes of the item's embedding (an upper bound), to cap what early results may hold."""
        raise NotImplementedError

    def assemble(self, item: Any, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One item's tensor, shaped as the model's own method returns it, from its units' outputs."""
        return outputs[0] if len(outputs) == 1 else torch.cat(list(outputs), dim=0)

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        raise NotImplementedError


class QwenVLTower(SGLangTower):
    """Qwen2.5-VL and Qwen3-VL: packed varlen tower, ragged batches of ``grid_thw`` rows."""

    ragged = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        visual = model.visual
        vcfg = model.config.vision_config
        self.merge = int(visual.spatial_merge_size)
        self.patch_dim = int(vcfg.in_channels if hasattr(vcfg, "in_channels") else vcfg.in_chans) * \
            int(vcfg.temporal_patch_size) * int(vcfg.patch_size) ** 2
        hidden = int(vcfg.hidden_size)
        inter = int(vcfg.intermediate_size)
        # A block's live activations per patch: residual, qkv, attention out, gate+up and down.
        self.bytes_per_patch = (5 * hidden + 3 * inter) * _dtype_bytes(visual.dtype)
        self._out_width = int(getattr(visual, "out_hidden_size", vcfg.out_hidden_size))
        self._out_dtype_bytes = _dtype_bytes(visual.dtype)
        self.slice_videos = any(c.__name__ == "Qwen3VLForConditionalGeneration" for c in type(model).__mro__)
        self._image = _unhooked(model, "get_image_feature")
        self._video = _unhooked(model, "get_video_feature")

    def _raw_pixels(self, item: Any) -> bool:
        grid = self._grid(item)
        return (grid is not None and item.feature.dim() == 2 and item.feature.shape[-1] == self.patch_dim
                and int(grid.prod(dim=-1).sum()) == item.feature.shape[0])

    @staticmethod
    def _grid(item: Any) -> torch.Tensor | None:
        name = "video_grid_thw" if _modality_name(item) == "video" else "image_grid_thw"
        grid = item.model_specific_data.get(name)
        return grid.reshape(-1, 3) if isinstance(grid, torch.Tensor) else None

    def units(self, item: Any) -> list[EncodeItem]:
        """One unit per image (``t*h*w`` patches); per video, ``t`` slices (Qwen3-VL) or one clip (Qwen2.5-VL)."""
        grid = self._grid(item).tolist()
        video = _modality_name(item) == "video"
        out, start = [], 0
        for index, (t, h, w) in enumerate(grid):
            rows = item.feature[start:start + t * h * w]
            start += t * h * w
            key = None if item.hash is None else (item.hash, index)
            if not video:
                out.append(EncodeItem(rows, t * h * w, "image", key, {"grid": (t, h, w)}))
            elif self.slice_videos:
                out.append(EncodeItem(rows.reshape(t, h * w, -1), h * w, "video", key, {"grid": (1, h, w)}))
            else:  # a single frame unit holding the whole clip: the coalescer must not split it
                out.append(EncodeItem(rows.unsqueeze(0), t * h * w, "video", key, {"grid": (t, h, w)}))
        return out

    def output_bytes(self, item: Any) -> int:
        tokens = int(self._grid(item).prod(dim=-1).sum()) // self.merge ** 2
        return tokens * self._out_width * self._out_dtype_bytes

    def validate(self, unit: EncodeItem) -> None:
        t, h, w = unit.meta["grid"]
        if h % self.merge or w % self.merge:
            raise ValueError(f"grid {(t, h, w)} is not a multiple of spatial_merge_size {self.merge}")

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        """Image units and video slices go through the model's own method of their modality."""
        from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

        outputs: list[torch.Tensor | None] = [None] * len(units)
        for modality, method, grid_name in (("image", self._image, "image_grid_thw"),
                                            ("video", self._video, "video_grid_thw")):
            picked = [i for i, u in enumerate(units) if u.modality == modality]
            if not picked:
                continue
            items = [MultimodalDataItem(
                modality=Modality.IMAGE if modality == "image" else Modality.VIDEO,
                feature=units[i].pixel_values.to(self.device, non_blocking=True),
                model_specific_data={grid_name: torch.tensor([units[i].meta["grid"]])}) for i in picked]
            packed = method(items)
            sizes = [units[i].pixel_values.shape[0] // self.merge ** 2 for i in picked]
            for i, out in zip(picked, torch.split(packed, sizes, dim=0), strict=True):
                outputs[i] = out
        return outputs  # type: ignore[return-value]


class Gemma3Tower(SGLangTower):
    """Gemma3: SigLIP at one fixed resolution, so every crop has the same patch count."""

    ragged = False
    modalities = ("image",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vcfg = model.config.vision_config
        self.image_size = int(vcfg.image_size)
        self.num_patches = (self.image_size // int(vcfg.patch_size)) ** 2
        hidden, inter = int(vcfg.hidden_size), int(vcfg.intermediate_size)
        self.bytes_per_patch = (5 * hidden + 2 * inter) * _dtype_bytes(model.language_model.dtype())
        self.batched_siglip = _siglip_takes_batches(model.vision_tower)
        self._bytes_per_crop = int(model.config.mm_tokens_per_image) * int(model.config.text_config.hidden_size) * \
            _dtype_bytes(model.language_model.dtype())

    def _raw_pixels(self, item: Any) -> bool:
        feature = item.feature
        return feature.dim() in (3, 4, 5) and feature.shape[-1] == self.image_size and \
            feature.shape[-2] == self.image_size

    def output_bytes(self, item: Any) -> int:
        return item.feature.reshape(-1, *item.feature.shape[-3:]).shape[0] * self._bytes_per_crop

    def units(self, item: Any) -> list[EncodeItem]:
        crops = item.feature.reshape(-1, *item.feature.shape[-3:])
        return [EncodeItem(crop, self.num_patches, "image", None if item.hash is None else (item.hash, i))
                for i, crop in enumerate(crops)]

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        model = self.model
        pixels = torch.stack([u.pixel_values for u in units]).to(
            device=model.vision_tower.device, dtype=model.language_model.dtype())
        if self.batched_siglip:
            vision = model.vision_tower(pixel_values=pixels)
        else:  # SDPA with flatten_batch asserts batch size 1: run the crops one by one.
            vision = torch.cat([model.vision_tower(pixel_values=pixels[i:i + 1]) for i in range(len(units))])
        projected = model.multi_modal_projector(vision)
        return list(projected.split(1, dim=0))


def _siglip_takes_batches(vision_tower: nn.Module) -> bool:
    """SGLang's SDPA vision attention with ``flatten_batch`` refuses batch > 1; varlen backends take it."""
    from sglang.srt.layers.attention.vision import VisionSdpaAttention

    return not any(isinstance(m, VisionSdpaAttention) and m.flatten_batch for m in vision_tower.modules())


class Gemma4Tower(SGLangTower):
    """Gemma4: variable resolution, so a batch holds images (or frames) of one patch count."""

    ragged = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vcfg = model.config.vision_config
        self.patch_pixels = 3 * int(vcfg.patch_size) ** 2
        self.text_hidden = int(model.config.text_config.hidden_size)
        hidden, inter = int(vcfg.hidden_size), int(vcfg.intermediate_size)
        self.bytes_per_patch = (5 * hidden + 3 * inter) * _dtype_bytes(model.language_model.dtype())
        self._pool = int(vcfg.pooling_kernel_size) ** 2
        self._bytes_per_token = self.text_hidden * _dtype_bytes(model.language_model.dtype())

    def output_bytes(self, item: Any) -> int:
        return item.feature[..., 0].numel() // self._pool * self._bytes_per_token

    def _raw_pixels(self, item: Any) -> bool:
        feature = item.feature
        positions = item.model_specific_data.get(self._positions_name(item))
        return (feature.dim() in (2, 3, 4) and feature.shape[-1] == self.patch_pixels
                and feature.shape[-1] != self.text_hidden and isinstance(positions, torch.Tensor)
                and positions.shape[:-1] == feature.shape[:-1])

    @staticmethod
    def _positions_name(item: Any) -> str:
        return "video_position_ids" if _modality_name(item) == "video" else "image_position_ids"

    def units(self, item: Any) -> list[EncodeItem]:
        """One unit per image or frame: ``[1, P, patch_pixels]`` with its ``[P, 2]`` positions."""
        video = _modality_name(item) == "video"
        pixels = item.feature.reshape(-1, *item.feature.shape[-2:])
        positions = item.model_specific_data[self._positions_name(item)].reshape(-1, pixels.shape[-2], 2)
        modality = "video" if video else "image"
        out = []
        for i, (pv, pp) in enumerate(zip(pixels, positions, strict=True)):
            key = None if item.hash is None else (item.hash, i)
            out.append(EncodeItem(pv.unsqueeze(0) if video else pv, pv.shape[0], modality, key, {"positions": pp}))
        return out

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        model = self.model
        vt = model.vision_tower
        pixels = torch.stack([u.pixel_values for u in units]).to(device=vt.device, dtype=model.language_model.dtype())
        positions = torch.stack([u.meta["positions"] for u in units]).to(vt.device)
        pooled, pooler_mask = vt(pixels, positions)
        return [model.embed_vision(inputs_embeds=hs[mask].unsqueeze(0)).squeeze(0)
                for hs, mask in zip(pooled, pooler_mask, strict=True)]


def tower_for(model: nn.Module) -> SGLangTower | None:
    """The adapter for ``model``'s class (or a subclass, e.g. Qwen3-VL-MoE), or None if unsupported."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for classes, adapter in ((QWEN_CLASSES, QwenVLTower), (GEMMA3_CLASSES, Gemma3Tower),
                             (GEMMA4_CLASSES, Gemma4Tower)):
        if names.intersection(classes):
            return adapter(model)
    return None
