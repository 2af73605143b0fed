"""Towers that wrap an SGLang model's own vision encoder, so coalesced results equal the model's.

Each adapter turns one SGLang ``MultimodalDataItem`` into coalescer units (``EncodeItem``), runs
batches of units through the model's own modules, and reassembles one item's outputs into exactly
the tensor the model's ``get_image_feature`` / ``get_video_feature`` would have produced for it.

* Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE (``ragged``): a batch is one packed varlen forward with one
  ``grid_thw`` row per unit, run through the model's unhooked ``get_*_feature``. Videos differ:
  Qwen3-VL splits a video into temporal slices ``(1, h, w)``, exact because its full attention is
  per slice (``token_cu_seqlens = repeat(h*w, t)`` in ``Qwen3VLMoeVisionModel.forward``) and its
  interpolated position embedding depends on ``(h, w)`` only. SGLang's Qwen2.5-VL tower is not
  sliceable: its full-attention ``cu_seqlens`` is the cumulative ``t*h*w`` of each grid row
  (``Qwen2_5_VisionTransformer.forward``), so every frame attends to the whole clip; a Qwen2.5-VL
  video is therefore one unit of ``t*h*w`` patches (splitting changed outputs by ~2% here).
* Gemma3 (uniform): SigLIP at a fixed resolution; units are single crops, stacked into one batch.
* Gemma4 (uniform per patch count): units are single images or video frames ``[P, patch_pixels]``
  with their position ids; one batch holds one ``P`` (padding patches carry position -1).

Selection is by exact class (:data:`SUPPORTED_MODELS`) plus a check of the vision modules: a
subclass (Qwen3.5, Cosmos3, Gemma4 unified, ...) may change the encoder or its inputs, so it keeps
SGLang's own path. :func:`why_unsupported` says why a model is left alone, :func:`tower_for` builds
the adapter otherwise.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import math
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mm_scheduler import EncodeItem
from mm_scheduler.executor import wait_asleep
from mm_scheduler.towers._staging import stage

from . import pixel_transport, sglang_compat
from .uniform_graphs import Gemma3VisionGraphs, Gemma4VisionGraphs, UniformGraphs, images_per_bucket
from .vit_graphs import QwenVisionGraphs, cut_into_runs, patch_width

logger = logging.getLogger(__name__)

# The vision module each supported model must hold, by attribute, as that exact class.
_QWEN2_5_VISION = {"visual": "sglang.srt.models.qwen2_5_vl.Qwen2_5_VisionTransformer"}
_QWEN3_VISION = {"visual": "sglang.srt.models.qwen3_vl.Qwen3VLMoeVisionModel"}
_GEMMA3_VISION = {"vision_tower": "sglang.srt.models.siglip.SiglipVisionModel",
                  "multi_modal_projector": "sglang.srt.models.gemma3_mm.Gemma3MultiModalProjector"}
_GEMMA4_VISION = {"vision_tower": "sglang.srt.models.gemma4_vision.Gemma4VisionEncoder",
                  "embed_vision": "sglang.srt.models.gemma4_mm.Gemma4MultimodalEmbedder"}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _modality_name(item: Any) -> str:
    return item.modality.name.lower()


def _model_device(module: nn.Module) -> torch.device:
    device = next(module.parameters()).device
    if device.type == "cuda" and device.index is None:  # the coalescer's forward thread selects it by index
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _unhooked(model: nn.Module, name: str) -> Callable[..., Any]:
    """The model's own method, beneath any plugin wrapper (ours routes here, so must not recurse)."""
    return inspect.unwrap(getattr(type(model), name)).__get__(model)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _structure_problem(model: nn.Module, expected: dict[str, str]) -> str | None:
    """Why ``model``'s vision modules are not exactly the ones an adapter drives, or None."""
    for attr, path in expected.items():
        module = getattr(model, attr, None)
        if module is None:
            return f"it has no {attr} (a language-model-only or encoder-free variant)"
        if type(module) is not _resolve(path):
            return f"its {attr} is {qualified_name(type(module))}, not {path}"
    return None


# --- CUDA-IPC / CUDA-VMM feature transport ------------------------------------------------------
def is_transport_proxy(value: Any) -> bool:
    """A CUDA-IPC feature proxy (``CudaVmmTensorTransportProxy`` is a subclass, so VMM counts)."""
    return not isinstance(value, torch.Tensor) and isinstance(value, sglang_compat.cuda_ipc_proxy_class())


def feature_shape(item: Any) -> torch.Size | None:
    """Shape of the item's pixel tensor without materialising it: the tensor's, or what a CUDA-IPC /
    CUDA-VMM proxy says it rebuilds to (``recons_shape`` / ``shape``). None for anything else."""
    feature = item.feature
    if isinstance(feature, torch.Tensor):
        return feature.shape
    if is_transport_proxy(feature):
        state = getattr(feature, "proxy_state", None)
        shape = state["ipc_extra"]["recons_shape"] if state is not None else feature.shape
        return torch.Size(shape)
    return None


def _wait_for_pending_copy(item: Any, device: torch.device) -> None:
    """Order the current stream after a host/device copy of the item's feature SGLang left in flight (0.5.23
    records its event under ``CUDA_IPC_FEATURE_COPY_EVENT_KEY``; the event stays for SGLang's own path)."""
    event_key = sglang_compat.cuda_ipc_copy_event_key()  # None: this SGLang records no such event
    if device.type == "cuda" and event_key is not None:
        pending = item.model_specific_data.get(event_key)
        if pending is not None:
            torch.cuda.current_stream(device).wait_event(pending)


def materialize_feature(item: Any, device: torch.device) -> torch.Tensor:
    """The item's pixel tensor, rebuilt in place from a transport proxy exactly as SGLang does.

    Qwen3-VL (TP=1 or DP encoder) defers the rebuild to its own ``_materialize_visual_items``,
    which calls ``item.reconstruct(device_index)``: one copy out of the shared pool into a fresh
    tensor, on the current stream, acknowledging the pool slice so it is recycled. We do the same
    call (so SGLang's own path later finds a plain tensor and copies nothing more), and make the
    current stream wait for a pending host/device copy SGLang recorded for the item (the event is
    left in place for SGLang's own path). SGLang's zero-copy "borrow" is not used: it keeps the
    pool slice leased until the encode runs, and an early encode may wait behind a queue.
    """
    _wait_for_pending_copy(item, device)
    if is_transport_proxy(item.feature):
        if device.type != "cuda":
            raise ValueError("a CUDA-IPC / CUDA-VMM feature can only be rebuilt on a CUDA device")
        with torch.cuda.device(device):
            item.reconstruct(device.index)
    return item.feature


def offloaded_by_sglang(item: Any) -> bool:
    """Whether the item's feature is in pinned host memory: where SGLang offloads a feature after a forward that
    embedded it, with ``non_blocking=True`` (``embed_mm_inputs``; Qwen3-VL's copy of borrowed CUDA-IPC features).

    That copy may still be landing, and only a copy into pinned memory can be. 0.5.23 records an event for it
    (``mm_schedule.host_offload_event``) that its own prefill path waits for before reading; 0.5.16 records none.
    An early encode reads the feature outside that path, unordered with the copy, so such an item is left to its
    prefill (a chunk after the first, a deferred item admitted late), which encodes it on demand after SGLang's wait.
    Fresh features from the tokenizer manager are pageable or transport proxies, never pinned.
    """
    feature = getattr(item, "feature", None)
    return isinstance(feature, torch.Tensor) and not feature.is_cuda and feature.is_pinned()


def on_one_device(items: Sequence[Any], device: torch.device,
                  widening: pixel_transport.Widening | None = None) -> list[Any]:
    """``items``, with their plain-tensor features moved to the tower's ``device`` when they are on several.

    SGLang 0.5.16's Qwen3-VL ``get_image_feature`` concatenates ``item.feature`` where it finds it. With
    ``--mm-feature-transport cuda_ipc`` a batch can hold features rebuilt on the GPU beside features on the
    CPU (a full IPC pool falls back to CPU transport, and ``general_mm_embed_routine`` offloads features to
    the CPU after each forward), and the concatenation raised in the scheduler and took the server down (real
    server, e12f02a, plugin off). Later SGLang moves every item to the tower's device itself (0.5.23
    ``_materialize_visual_items``); this does the same for the calls the plugin hands to SGLang's method, after
    any copy SGLang still has in flight into a feature (0.5.23 offloads re-prefill features on a copy stream).
    uint8 pixels (``sglang.uint8_pixels``) are widened on ``device`` by ``widening``, as SGLang's method expects the
    processor's float pixels."""
    devices = {item.feature.device for item in items if isinstance(item.feature, torch.Tensor)}
    if len(devices) > 1:
        for item in items:
            if isinstance(item.feature, torch.Tensor) and item.feature.device != device:
                _wait_for_pending_copy(item, device)
                item.feature = item.feature.to(device, non_blocking=True)
    pixel_transport.widen_items(items, widening, device)
    return list(items)


def stack_on(tensors: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype | None = None,
             widening: pixel_transport.Widening | None = None) -> torch.Tensor:
    """``torch.stack`` landing on ``device`` (and ``dtype``), by the core's :func:`stage`: host tensors through pinned
    memory, never a copy that makes the thread wait for the GPU. A plain ``.to(cuda, dtype)`` of a pageable host
    tensor synchronized the encoder stream, so the forward thread waited for every batch ahead of it (Gemma3's
    real server: 361 ms a forward's "launch", e5bb1ae). A ``cuda_ipc`` batch can hold units rebuilt on the GPU
    beside units on the CPU (:func:`on_one_device`): ``stage`` copies each where it is. uint8 pixels
    (``sglang.uint8_pixels``) land as uint8, a quarter of the bytes, and are widened there by ``widening`` before
    the cast to the floating ``dtype`` their caller passes (without a widening, uint8 stays uint8)."""
    dtype = dtype or tensors[0].dtype
    narrow = [t.dtype == torch.uint8 for t in tensors]
    if widening is None or not any(narrow) or not dtype.is_floating_point:
        return stage(tensors, device, dtype)
    if all(narrow):
        return widening(stage(tensors, device, torch.uint8)).to(dtype)
    return stage([widening(t) for t in tensors], device, dtype)  # a widening leaves float units as they are


def _tensor_digest(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Shape, dtype and a content digest of a small CPU-side tensor (positions, grids)."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
    return tuple(data.shape), str(data.dtype), digest


class SGLangTower:
    """Common part: which items an adapter takes, the key of a result, the bookkeeping the coalescer needs."""

    ragged: bool
    bytes_per_patch: int
    probe_patch_counts: tuple[int, ...]
    modalities: tuple[str, ...] = ("image", "video")
    feature_methods: tuple[str, ...] = ("get_image_feature", "get_video_feature")
    """The model's encoder methods the plugin routes through the service."""
    vision_modules: ClassVar[dict[str, str]] = {}
    collective_free: bool = False
    """True when forwards issue no collective even at TP>1 (a replicated tower called directly)."""
    widening: pixel_transport.Widening | None = None
    """How this server's uint8 image pixels become the processor's float32 pixels (``sglang.uint8_pixels``, set by
    the plugin from the scheduler's image processor); None: pixels arrive as the model takes them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = _model_device(model)

    @classmethod
    def why_unsupported(cls, model: nn.Module) -> str | None:
        """Why this adapter cannot drive ``model`` (the class is already known to be allowed)."""
        return _structure_problem(model, cls.vision_modules)

    def accepts(self, item: Any) -> bool:
        """True for raw pixel items of a supported modality (precomputed embeddings stay with SGLang).

        A CUDA-IPC / CUDA-VMM proxy is judged by the layout it describes, and taken only by a tower
        on CUDA (the only place SGLang can rebuild it); :meth:`units` materialises it.
        """
        shape = feature_shape(item)
        if shape is None or (self.device.type != "cuda" and not isinstance(item.feature, torch.Tensor)):
            return False
        return (_modality_name(item) in self.modalities and item.precomputed_embeddings is None
                and self._raw_pixels(item, shape))

    def _raw_pixels(self, item: Any, shape: torch.Size) -> bool:
        raise NotImplementedError

    def result_key(self, item: Any) -> Hashable | None:
        """Everything that decides this item's encoder output; None if SGLang gave it no hash.

        SGLang's ``item.hash`` is, by default, ``hash_feature(feature)``: a SHA-256 of the
        preprocessed pixel *bytes* (``tensor_hash`` flattens, so shape and dtype are not in it).
        It may instead be a caller's ``mm_hashes`` entry (raw content, blind to preprocessing) or
        an artifact-cache key. The key therefore adds the preprocessed layout (feature shape,
        grids, position ids) and the placeholder token count: two items share a result only if
        SGLang's own embedding cache (keyed by hash and token count) would, and have the same layout.
        """
        if item.hash is None:
            return None
        return (_modality_name(item), item.hash, self._layout(item), self.token_count(item))

    def token_count(self, item: Any) -> int:
        """Placeholder tokens of the item: its ``offsets`` spans, as SGLang's embedding cache counts
        them, or (before the processor set them) the rows the encoder will return for its layout."""
        offsets = getattr(item, "offsets", None)
        if offsets:
            return sum(end - start + 1 for start, end in offsets)
        return self.output_tokens(item)

    def output_tokens(self, item: Any) -> int:
        """Rows of the item's embedding, from its layout alone."""
        raise NotImplementedError

    def _layout(self, item: Any) -> Hashable:
        return tuple(feature_shape(item) or ())

    def units(self, item: Any) -> list[EncodeItem]:
        """The coalescer units of one SGLang item; ``assemble`` undoes the split."""
        raise NotImplementedError

    def _unit_key(self, item: Any, index: int) -> Hashable | None:
        key = self.result_key(item)
        return None if key is None else (key, index)

    def output_bytes(self, item: Any) -> int:
        """Bytes of the item's embedding (an upper bound), to cap what early results may hold."""
        raise NotImplementedError

    def assemble(self, item: Any, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """One item's tensor, shaped as the model's own method returns it, from its units' outputs."""
        return outputs[0] if len(outputs) == 1 else torch.cat(list(outputs), dim=0)

    def probe_units(self, num_patches: int) -> list[EncodeItem]:
        """Units of about ``num_patches`` patches shaped like real inputs, for ``calibrate_tower``."""
        raise NotImplementedError

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        raise NotImplementedError

    def use_graphs(self, buckets: Sequence[int], *, tp_size: int) -> str:
        """Capture the tower's CUDA graphs for these patch buckets (before serving, ``vit_graph_patches``); sets
        ``graphs`` when it captured; returns a log line."""
        raise NotImplementedError

    def encode_now(self, items: list[Any], original: Callable[[list[Any]], Any]) -> Any:
        """One prefill's items encoded on the caller's thread and stream, as the model's own ``original``
        method returns them: the idle path (``early_encode_min_waiting``), where there is nothing to batch with."""
        return original(items)


class QwenVLTower(SGLangTower):
    """Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: packed varlen tower, ragged batches of ``grid_thw`` rows."""

    ragged = True
    PROBE_SIDE = 32
    """Probe images are ``32 x 32`` patches (448 px at patch 14), a typical image after ``max_pixels``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        visual = model.visual
        embed = visual.patch_embed
        self.merge = int(visual.spatial_merge_size)
        self.patch_dim = patch_width(visual)
        # Read from the modules: Qwen3-VL-MoE keeps only its text config on the model.
        hidden = int(embed.embed_dim)
        mlp = sum(p.numel() for p in visual.blocks[0].mlp.parameters() if p.dim() == 2) // hidden
        # A block's live activations per patch: residual, qkv, attention out, and the MLP's widths.
        self.bytes_per_patch = (5 * hidden + mlp) * _dtype_bytes(visual.dtype)
        self._out_width = int(visual.out_hidden_size)
        self._out_dtype_bytes = _dtype_bytes(visual.dtype)
        self.slice_videos = qualified_name(type(model)) != \
            "sglang.srt.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration"
        self._image = _unhooked(model, "get_image_feature")
        self._video = _unhooked(model, "get_video_feature")
        # --mm-enable-dp-encoder builds the tower replicated and its get_*_feature shards the images
        # over the ranks with collectives. Calling the replicated tower directly (as get_*_feature
        # does without the flag) keeps every forward collective-free, so the async coalescer is safe
        # at any TP size (integration/modes.py); each rank then encodes all of its items itself.
        self.collective_free = bool(getattr(model, "use_data_parallel", False)) and not self.slice_videos
        side = max(self.merge, self.PROBE_SIDE // self.merge * self.merge)
        self._probe_side = side
        self.probe_patch_counts = (side * side, 2 * side * side, 4 * side * side)
        self.graphs: QwenVisionGraphs | None = None
        """Captured forwards (``use_graphs``); None: every forward runs the tower's own code."""

    def use_graphs(self, buckets: Sequence[int], *, tp_size: int) -> str:
        """Capture the tower's forward for these patch buckets (before serving); returns a log line."""
        reason = QwenVisionGraphs.why_not(self.model.visual)
        if reason is None and not self.collective_free and tp_size > 1:
            reason = "the tower is sharded over TP ranks (its collectives would be captured)"
        if reason is not None:
            return f"ViT CUDA graphs off: {reason}"
        graphs = QwenVisionGraphs(self.model.visual, buckets)
        pool = graphs.capture()
        self.graphs = graphs
        return (f"ViT CUDA graphs captured for {sorted({b.patches for b in graphs.buckets})} patches, "
                f"{len(graphs.buckets)} graphs (one pool, {pool / 2**20:.0f} MiB)")

    @classmethod
    def why_unsupported(cls, model: nn.Module) -> str | None:
        """Also refuses the ViT CUDA-graph path: its outputs are views of a static buffer that the next
        replay overwrites, and capture from the coalescer's thread is not safe."""
        qwen2_5 = qualified_name(type(model)).endswith(".Qwen2_5_VLForConditionalGeneration")
        problem = _structure_problem(model, _QWEN2_5_VISION if qwen2_5 else _QWEN3_VISION)
        if problem is not None:
            return problem
        if qwen2_5:  # decided once in Qwen2_5_VisionTransformer.__init__ (CUDA and the env var)
            graph = bool(getattr(model.visual, "enable_cg", False))
        else:  # read on every Qwen3VLMoeVisionModel.forward, on any device
            from sglang.srt.environ import envs

            graph = bool(envs.SGLANG_VIT_ENABLE_CUDA_GRAPH.get())
        if graph:
            return "SGLANG_VIT_ENABLE_CUDA_GRAPH is on: its vision outputs are views of a graph's static buffer"
        return None

    def _raw_pixels(self, item: Any, shape: torch.Size) -> bool:
        grid = self._grid(item)
        return (grid is not None and len(shape) == 2 and shape[-1] == self.patch_dim
                and int(grid.prod(dim=-1).sum()) == shape[0])

    @staticmethod
    def _grid(item: Any) -> torch.Tensor | None:
        name = "video_grid_thw" if _modality_name(item) == "video" else "image_grid_thw"
        grid = item.model_specific_data.get(name)
        return grid.reshape(-1, 3) if isinstance(grid, torch.Tensor) else None

    def _layout(self, item: Any) -> Hashable:
        grid = self._grid(item)
        return (tuple(feature_shape(item) or ()),
                None if grid is None else tuple(tuple(int(v) for v in row) for row in grid.tolist()))

    def units(self, item: Any) -> list[EncodeItem]:
        """One unit per image (``t*h*w`` patches); per video, ``t`` slices (Qwen3-VL) or one clip (Qwen2.5-VL)."""
        feature = materialize_feature(item, self.device)
        grid = self._grid(item).tolist()
        video = _modality_name(item) == "video"
        out, start = [], 0
        for index, (t, h, w) in enumerate(grid):
            rows = feature[start:start + t * h * w]
            start += t * h * w
            key = self._unit_key(item, index)
            if not video:
                out.append(EncodeItem(rows, t * h * w, "image", key, {"grid": (t, h, w)}))
            elif self.slice_videos:
                out.append(EncodeItem(rows.reshape(t, h * w, -1), h * w, "video", key, {"grid": (1, h, w)}))
            else:  # a single frame unit holding the whole clip: the coalescer must not split it
                out.append(EncodeItem(rows.unsqueeze(0), t * h * w, "video", key, {"grid": (t, h, w)}))
        return out

    def output_tokens(self, item: Any) -> int:
        return int(self._grid(item).prod(dim=-1).sum()) // self.merge ** 2

    def output_bytes(self, item: Any) -> int:
        return self.output_tokens(item) * self._out_width * self._out_dtype_bytes

    def validate(self, unit: EncodeItem) -> None:
        t, h, w = unit.meta["grid"]
        if h % self.merge or w % self.merge:
            raise ValueError(f"grid {(t, h, w)} is not a multiple of spatial_merge_size {self.merge}")

    def probe_units(self, num_patches: int) -> list[EncodeItem]:
        """Square images of ``PROBE_SIDE`` patches a side, then one ``merge``-high image for the rest;
        float32 pixels on the tower's device, as the processor hands them over with CUDA-IPC."""
        unit = self.merge ** 2
        remaining = max(unit, num_patches // unit * unit)
        side = self._probe_side
        out = []
        while remaining > 0:
            h, w = (side, side) if remaining >= side * side else (self.merge, remaining // self.merge)
            pixels = torch.randn(h * w, self.patch_dim, device=self.device)
            out.append(EncodeItem(pixels, h * w, "image", None, {"grid": (1, h, w)}))
            remaining -= h * w
        return out

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
                feature=self._on_device(units[i].pixel_values),
                model_specific_data={grid_name: torch.tensor([units[i].meta["grid"]])}) for i in picked]
            for start, stop in self._graph_runs([units[i] for i in picked]):
                packed = self._encode(items[start:stop], method, grid_name)
                sizes = [units[i].pixel_values.shape[0] // self.merge ** 2 for i in picked[start:stop]]
                for i, out in zip(picked[start:stop], torch.split(packed, sizes, dim=0), strict=True):
                    outputs[i] = out
        return outputs  # type: ignore[return-value]

    def _on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """A unit's pixels on the tower's device, widened there when they came as uint8 (``sglang.uint8_pixels``)."""
        pixels = pixels.to(self.device, non_blocking=True)
        return pixels if self.widening is None else self.widening(pixels)

    def encode_now(self, items: list[Any], original: Callable[[list[Any]], Any]) -> Any:
        """Images by one graph replay on the caller's stream when a captured bucket holds them all: no launch
        of ~1,400 kernels from Python, so the idle path is faster than the model's own call. Videos, images no
        bucket holds, and a replay that fails go to ``original`` (SGLang's behaviour stays the floor)."""
        if self.graphs is None or any(_modality_name(item) != "image" for item in items):
            return original(items)
        try:  # features may be CUDA-IPC proxies beside CPU tensors (a full IPC pool): one device first
            pixels = torch.cat([materialize_feature(item, self.device).to(self.device, non_blocking=True)
                                for item in items])
            packed = self.graphs.run(pixels, torch.cat([self._grid(item) for item in items]))
        except Exception:
            logger.warning("mm-coalescer: inline graph replay failed; using the model's own method", exc_info=True)
            packed = None
        return original(items) if packed is None else packed

    def _graph_runs(self, units: Sequence[EncodeItem]) -> list[tuple[int, int]]:
        """Consecutive runs of units cut to the captured buckets (``cut_into_runs``); one run without graphs."""
        if self.graphs is None:
            return [(0, len(units))]
        return cut_into_runs([unit.pixel_values.shape[0] for unit in units], self.graphs.buckets)

    def _encode(self, items: list[Any], method: Callable[[list[Any]], torch.Tensor], grid_name: str) -> torch.Tensor:
        """One packed forward: a captured graph when one holds the batch, else the tower itself."""
        if self.graphs is None and not self.collective_free:
            return method(items)
        pixels = torch.cat([item.feature for item in items]).type(self.model.visual.dtype)
        grids = torch.cat([item.model_specific_data[grid_name] for item in items])
        packed = None if self.graphs is None else self.graphs.run(pixels, grids)
        if packed is not None:
            return packed
        return self.model.visual(pixels, grid_thw=grids.to(self.device)) if self.collective_free else method(items)


class _UniformGraphed:
    """Graphs for the towers whose images all have one input shape (Gemma3, Gemma 4): ``uniform_graphs``."""

    graphs_class: ClassVar[type[UniformGraphs]]
    image_patches: int
    """Patches of the image shape the graphs hold."""
    graphs: UniformGraphs | None = None
    """Captured forwards (``use_graphs``); None: every forward runs the tower's own code."""
    model: nn.Module
    accepts: Callable[[Any], bool]
    units: Callable[[Any], list[EncodeItem]]
    forward: Callable[[Sequence[EncodeItem]], list[torch.Tensor]]

    def use_graphs(self, buckets: Sequence[int], *, tp_size: int) -> str:
        """Capture the tower for the batch sizes of images these patch buckets hold (before serving); a log line."""
        reason = self.graphs_class.why_not(self.model)
        sizes = images_per_bucket(buckets, self.image_patches)
        if reason is None and tp_size > 1:
            reason = "the tower is sharded over TP ranks (its collectives would be captured)"
        if reason is None and not sizes:
            reason = f"no bucket holds one image of {self.image_patches} patches"
        if reason is not None:
            return f"ViT CUDA graphs off: {reason}"
        graphs = self.graphs_class(self.model, self.image_patches, sizes)
        pool = graphs.capture()
        self.graphs = graphs
        padded = f"; a lone image replays as {sizes[0]}" if sizes[0] > 1 else ""
        return (f"ViT CUDA graphs captured for batches of {sizes} images of {self.image_patches} patches "
                f"(one pool, {pool / 2**20:.0f} MiB{padded})")

    def _replayed_or_eager(self, inputs: list[torch.Tensor],
                           eager: Callable[..., list[torch.Tensor]]) -> list[torch.Tensor]:
        """Runs of the batch cut to the captured sizes and replayed (``UniformGraphs.runs``); a run the graphs decline
        (another thread is replaying) and a batch of another shape run ``eager``, the tower's own code."""
        if self.graphs is None:
            return eager(*inputs)
        count = inputs[0].shape[0]
        outputs: list[torch.Tensor] = []
        for start, stop in self.graphs.runs(count) if self.graphs.holds(*inputs) else [(0, count)]:
            part = [x[start:stop] for x in inputs]
            replayed = self.graphs.run(*part)  # None (counted as eager): no graph holds it
            outputs.extend(replayed if replayed is not None else eager(*part))
        return outputs

    def encode_now(self, items: list[Any], original: Callable[[list[Any]], Any]) -> Any:
        """Images of the captured shape by graph replays on the caller's stream: no launch of ~1,000 kernels from
        Python, so the idle path is faster than the model's own call. Videos, other shapes, precomputed embeddings,
        and a replay that raises go to ``original`` (SGLang's behaviour stays the floor); a run the graphs decline
        runs the tower's own code in ``forward``, with the same result."""
        if self.graphs is None or any(_modality_name(item) != "image" or not self.accepts(item) for item in items):
            return original(items)
        try:
            units = [unit for item in items for unit in self.units(item)]
            if any(unit.num_patches != self.graphs.patches for unit in units):
                return original(items)
            return torch.cat(self.forward(units))
        except Exception:
            logger.warning("mm-coalescer: inline graph replay failed; using the model's own method", exc_info=True)
            return original(items)


class Gemma3Tower(_UniformGraphed, SGLangTower):
    """Gemma3: SigLIP at one fixed resolution, so every crop has the same patch count."""

    graphs_class = Gemma3VisionGraphs

    ragged = False
    modalities = ("image",)
    feature_methods = ("get_image_feature",)
    vision_modules: ClassVar[dict[str, str]] = _GEMMA3_VISION

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vcfg = model.config.vision_config
        self.image_size = int(vcfg.image_size)
        self.num_patches = (self.image_size // int(vcfg.patch_size)) ** 2
        self.image_patches = self.num_patches
        hidden, inter = int(vcfg.hidden_size), int(vcfg.intermediate_size)
        self.bytes_per_patch = (5 * hidden + 2 * inter) * _dtype_bytes(model.language_model.dtype())
        _let_siglip_batch(model.vision_tower)
        self._tokens_per_crop = int(model.config.mm_tokens_per_image)
        self._bytes_per_crop = self._tokens_per_crop * int(model.config.text_config.hidden_size) * \
            _dtype_bytes(model.language_model.dtype())
        self.probe_patch_counts = (self.num_patches, 2 * self.num_patches, 4 * self.num_patches)

    def _raw_pixels(self, item: Any, shape: torch.Size) -> bool:
        return len(shape) in (3, 4, 5) and shape[-1] == self.image_size and shape[-2] == self.image_size

    @staticmethod
    def _crops(shape: torch.Size) -> int:
        return math.prod(shape[:-3])

    def output_tokens(self, item: Any) -> int:
        return self._crops(feature_shape(item)) * self._tokens_per_crop

    def output_bytes(self, item: Any) -> int:
        return self._crops(feature_shape(item)) * self._bytes_per_crop

    def units(self, item: Any) -> list[EncodeItem]:
        feature = materialize_feature(item, self.device)
        crops = feature.reshape(-1, *feature.shape[-3:])
        return [EncodeItem(crop, self.num_patches, "image", self._unit_key(item, i)) for i, crop in enumerate(crops)]

    def probe_units(self, num_patches: int) -> list[EncodeItem]:
        """Whole crops at the model's resolution (float32, as the processor emits them)."""
        crops = max(1, math.ceil(num_patches / self.num_patches))
        return [EncodeItem(torch.randn(3, self.image_size, self.image_size, device=self.device), self.num_patches)
                for _ in range(crops)]

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        model = self.model
        pixels = stack_on([u.pixel_values for u in units], model.vision_tower.device, model.language_model.dtype(),
                          self.widening)
        return self._replayed_or_eager([pixels], self._eager)

    def _eager(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """SigLIP and the projector, as SGLang's ``get_image_feature`` runs them."""
        model = self.model
        projected = model.multi_modal_projector(model.vision_tower(pixel_values=pixels))
        return list(projected.split(1, dim=0))


def _takes_batches(vision_tower: nn.Module) -> bool:
    """SGLang's SDPA vision attention with ``flatten_batch`` refuses batch > 1; varlen backends take it.

    Gemma4's tower builds it so on SDPA in 0.5.16 and 0.5.17 (``flatten_batch=True``; later releases turn it off
    for SDPA), so the adapter asks the modules rather than the version. (SigLIP does too, on every release, but
    needs no mask: :func:`_let_siglip_batch`.)"""
    from sglang.srt.layers.attention.vision import VisionSdpaAttention

    return not any(isinstance(m, VisionSdpaAttention) and m.flatten_batch for m in vision_tower.modules())


def _let_siglip_batch(vision_tower: nn.Module) -> None:
    """Let SigLIP's SDPA attention take a batch of crops (the other backends, varlen, always do).

    SGLang builds SigLIP's attention with ``flatten_batch``, which on the SDPA backend only asserts batch size 1:
    SigLIP passes no ``cu_seqlens`` (0.5.16 to 0.5.23; a test checks), so no mask is built either way and a batch
    of equal crops attends within each crop. Unset, a batch runs in one forward (an H200 with the 12B's tower:
    15.2 against 16.4 ms a crop at 6 crops, ``benchmarks/vision_attention_backends.py``); SGLang's own calls, one
    crop each, are unchanged."""
    from sglang.srt.layers.attention.vision import VisionSdpaAttention

    for module in vision_tower.modules():
        if isinstance(module, VisionSdpaAttention):
            module.flatten_batch = False


class Gemma4Tower(_UniformGraphed, SGLangTower):
    """Gemma4: variable resolution, so a batch holds images (or frames) of one patch count."""

    graphs_class = Gemma4VisionGraphs

    ragged = False
    vision_modules: ClassVar[dict[str, str]] = _GEMMA4_VISION
    PROBE_SOFT_TOKENS = (14, 20)
    """Probe images pool to 14 x 20 = 280 soft tokens, the Gemma4 image processor's ``max_soft_tokens``
    default, so each holds ``280 * pooling_kernel_size**2`` patches as real (padded) images do."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        vcfg = model.config.vision_config
        self.patch_pixels = 3 * int(vcfg.patch_size) ** 2
        self.text_hidden = int(model.config.text_config.hidden_size)
        hidden, inter = int(vcfg.hidden_size), int(vcfg.intermediate_size)
        self.bytes_per_patch = (5 * hidden + 3 * inter) * _dtype_bytes(model.language_model.dtype())
        self.batched = _takes_batches(model.vision_tower)
        self._kernel = int(vcfg.pooling_kernel_size)
        self._pool = self._kernel ** 2
        self._bytes_per_token = self.text_hidden * _dtype_bytes(model.language_model.dtype())
        rows, cols = self.PROBE_SOFT_TOKENS
        self._probe_grid = (rows * self._kernel, cols * self._kernel)
        per_image = self._probe_grid[0] * self._probe_grid[1]
        self.image_patches = per_image
        """Patches of an image at the processor's default budget (280 soft tokens): the patch count graphs hold."""
        self.probe_patch_counts = (per_image, 2 * per_image, 4 * per_image)

    def output_tokens(self, item: Any) -> int:
        """Per image or frame, its real (position != -1) patches pooled by ``kernel**2``, rounded up."""
        positions = item.model_specific_data[self._positions_name(item)]
        real = (positions != -1).any(dim=-1).reshape(-1, positions.shape[-2]).sum(dim=-1)
        return int((-(-real // self._pool)).sum())

    def output_bytes(self, item: Any) -> int:
        return math.prod(feature_shape(item)[:-1]) // self._pool * self._bytes_per_token

    def _raw_pixels(self, item: Any, shape: torch.Size) -> bool:
        positions = item.model_specific_data.get(self._positions_name(item))
        return (len(shape) in (2, 3, 4) and shape[-1] == self.patch_pixels
                and shape[-1] != self.text_hidden and isinstance(positions, torch.Tensor)
                and positions.shape[:-1] == shape[:-1])

    def _layout(self, item: Any) -> Hashable:
        """Position ids decide the output too (which patches are real, and where): their digest."""
        positions = item.model_specific_data.get(self._positions_name(item))
        return (tuple(feature_shape(item) or ()),
                _tensor_digest(positions) if isinstance(positions, torch.Tensor) else None)

    @staticmethod
    def _positions_name(item: Any) -> str:
        return "video_position_ids" if _modality_name(item) == "video" else "image_position_ids"

    def units(self, item: Any) -> list[EncodeItem]:
        """One unit per image or frame: ``[1, P, patch_pixels]`` with its ``[P, 2]`` positions."""
        video = _modality_name(item) == "video"
        feature = materialize_feature(item, self.device)
        pixels = feature.reshape(-1, *feature.shape[-2:])
        positions = item.model_specific_data[self._positions_name(item)].reshape(-1, pixels.shape[-2], 2)
        modality = "video" if video else "image"
        out = []
        for i, (pv, pp) in enumerate(zip(pixels, positions, strict=True)):
            out.append(EncodeItem(pv.unsqueeze(0) if video else pv, pv.shape[0], modality,
                                  self._unit_key(item, i), {"positions": pp}))
        return out

    def probe_units(self, num_patches: int) -> list[EncodeItem]:
        """Full (unpadded) images of the probe grid, with raster position ids ``(x, y)``."""
        gh, gw = self._probe_grid
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
        count = max(1, num_patches // (gh * gw))
        return [EncodeItem(torch.randn(gh * gw, self.patch_pixels, device=self.device), gh * gw, "image", None,
                           {"positions": positions}) for _ in range(count)]

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        model = self.model
        vt = model.vision_tower
        pixels = stack_on([u.pixel_values for u in units], vt.device, model.language_model.dtype(), self.widening)
        positions = stack_on([u.meta["positions"] for u in units], vt.device)
        return self._replayed_or_eager([pixels, positions], self._eager)

    def _eager(self, pixels: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor]:
        """The tower's own forward and projection, image by image as SGLang's ``get_image_feature`` projects them."""
        model = self.model
        vt = model.vision_tower
        if self.batched:
            pooled, pooler_mask = vt(pixels, positions)
        else:  # SDPA with flatten_batch asserts batch size 1: run the images one by one.
            runs = [vt(pixels[i:i + 1], positions[i:i + 1]) for i in range(pixels.shape[0])]
            pooled = [hs for p, _ in runs for hs in p]
            pooler_mask = [m for _, masks in runs for m in masks]
        return self._projected(pooled, pooler_mask)

    def _projected(self, pooled: Sequence[torch.Tensor], pooler_mask: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's real pooled rows, projected. A mask index waits for the tower: that wait is made asleep."""
        wait_asleep(pooled[0])
        return [self.model.embed_vision(inputs_embeds=hs[mask].unsqueeze(0)).squeeze(0)
                for hs, mask in zip(pooled, pooler_mask, strict=True)]


_ADAPTERS: dict[str, type[SGLangTower]] = {
    "sglang.srt.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration": QwenVLTower,
    "sglang.srt.models.qwen3_vl.Qwen3VLForConditionalGeneration": QwenVLTower,
    "sglang.srt.models.qwen3_vl_moe.Qwen3VLMoeForConditionalGeneration": QwenVLTower,
    "sglang.srt.models.gemma3_mm.Gemma3ForConditionalGeneration": Gemma3Tower,
    "sglang.srt.models.gemma4_mm.Gemma4ForConditionalGeneration": Gemma4Tower,
}
SUPPORTED_MODELS: dict[str, tuple[str, ...]] = {path: adapter.feature_methods for path, adapter in _ADAPTERS.items()}
"""Exactly these classes (module path + name) get an adapter, with the encoder methods to route.
Classes are named, not imported: importing every model module to compare would pull them all in."""


def why_unsupported(model: nn.Module) -> str | None:
    """Why the plugin leaves ``model`` to SGLang (one line for the log), or None if an adapter drives it."""
    cls = type(model)
    path = qualified_name(cls)
    if path not in _ADAPTERS:
        return f"{path} is not one of the supported classes ({', '.join(sorted(_ADAPTERS))})"
    module = sys.modules.get(cls.__module__)
    if getattr(module, cls.__name__, None) is not cls:
        return f"{path} is not the class SGLang defines under that name"
    problem = _ADAPTERS[path].why_unsupported(model)
    return None if problem is None else f"{cls.__name__}: {problem}"


def tower_for(model: nn.Module) -> SGLangTower | None:
    """The adapter for ``model`` when its exact class and vision modules are supported, else None
    (ask :func:`why_unsupported` for the reason)."""
    if why_unsupported(model) is not None:
        return None
    return _ADAPTERS[qualified_name(type(model))](model)
