"""Qwen2.5-VL vision transformer as a ragged :class:`Tower`: images and video slices packed in one forward.

Built from transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (random weights). A unit is
one image, or one temporal slice of a video, as the processor emits it: ``pixel_values`` of shape
``[h * w, channels * temporal_patch * patch * patch]`` (``[h*w, 1176]``) with ``meta["grid_hw"] =
(h, w)`` in patches; a video item is ``[slices, h * w, 1176]``. Frames of a video attend only within
themselves in this model, so encoding slices as separate ``(1, h, w)`` grids gives the same result
as one ``(t, h, w)`` grid, and lets slices batch with images.

The forward reuses the model's own modules (patch embed, blocks' norms / qkv / proj / MLP, merger)
but does its own bookkeeping: window indices, cu_seqlens and rotary positions are computed on the
host from the grid sizes (no ``.tolist()`` of device tensors, so no stream sync inside the forward)
and attention runs as one packed varlen flash kernel per layer on CUDA instead of one SDPA call
per window, which the stock sdpa path does (thousands of launches for a batch). On CPU, or where
the varlen kernel is missing, sequences of equal length are batched into one SDPA call each.
``tests/gpu`` checks the result against the stock ``model(hidden_states, grid_thw)``.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..types import EncodeItem
from ._staging import handed_off, resolve_device, stage

try:  # torch >= 2.10 ships a packed variable-length flash attention
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

QWEN2_5_VL_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                     fullatt_block_indexes=[7, 15, 23, 31])
EXAMPLE_GRIDS = ((16, 16), (24, 24), (32, 32), (20, 36), (36, 20))
"""(h, w) patch grids of example_request images: 224, 336 and 448 px squares, 280x504 and 504x280."""
TINY = dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=48,
            fullatt_block_indexes=[1, 3])


@dataclass(frozen=True)
class _Segments:
    """Packed sequences of one attention kind: boundaries for varlen, index groups for the SDPA path."""

    cu_seqlens: np.ndarray
    max_len: int

    @functools.cached_property
    def groups(self) -> list[np.ndarray]:
        """``[n, length]`` token indices of the ``n`` sequences of each distinct length."""
        starts, lengths = self.cu_seqlens[:-1], np.diff(self.cu_seqlens)
        out = []
        for length in np.unique(lengths):
            first = starts[lengths == length]
            out.append(first[:, None].astype(np.int64) + np.arange(length)[None, :])
        return out


@dataclass(frozen=True)
class _UnitPlan:
    """Per-grid-size layout, cached: the window order of merge blocks and each token's (row, col)."""

    window_index: np.ndarray  # merge-block order for windowed attention
    window_lens: np.ndarray  # tokens per non-empty window, in window order
    positions: np.ndarray  # [h*w, 2] (row, col) of each token, in the processor's block-major order


class Qwen25VLTower:
    """Qwen2.5-VL vision encoder; output per unit is the merged embedding ``[h*w/4, out_hidden_size]``."""

    ragged = True

    def __init__(self, device: str | torch.device = "cuda", *, dtype: torch.dtype | None = None,
                 tiny: bool = False, seed: int = 0, attention: str = "auto") -> None:
        from transformers import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        if attention not in ("auto", "varlen", "sdpa"):
            raise ValueError(f"attention must be 'auto', 'varlen' or 'sdpa', got {attention!r}")
        self.device = resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.config = Qwen2_5_VLVisionConfig(**(TINY if tiny else QWEN2_5_VL_7B))
        cfg = self.config
        self.merge = cfg.spatial_merge_size
        self.unit_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size
        self.window_blocks = cfg.window_size // self.merge // cfg.patch_size
        self.full_attention_layers = frozenset(cfg.fullatt_block_indexes)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        use_varlen = self.device.type == "cuda" and varlen_attn is not None
        if attention == "varlen" and not use_varlen:
            raise ValueError("attention='varlen' needs CUDA and torch.nn.attention.varlen")
        self.attention = "varlen" if use_varlen and attention != "sdpa" else "sdpa"
        torch.manual_seed(seed)
        with torch.device(self.device):
            model = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="sdpa")
        self.model = model.to(self.dtype).eval().requires_grad_(False)
        self.inv_freq = model.rotary_pos_emb.inv_freq.detach().float().to(self.device)
        self.bytes_per_patch = cfg.hidden_size * 2 * cfg.depth
        self.consumer_stream = torch.cuda.default_stream(self.device) if self.device.type == "cuda" else None
        self._pools: dict[tuple[int, int, int | None], list[torch.Tensor]] = {}

    # --- input contract ----------------------------------------------------------------------
    def validate(self, item: EncodeItem) -> None:
        """Reject inputs whose shape, grid and patch count disagree, before they reach a batch."""
        grid = item.meta.get("grid_hw")
        if grid is None or len(grid) != 2:
            raise ValueError("Qwen2.5-VL items need meta['grid_hw'] = (h, w) in patches")
        h, w = (int(v) for v in grid)
        if h <= 0 or w <= 0 or h % self.merge or w % self.merge:
            raise ValueError(f"grid_hw {grid} must be positive multiples of the merge size {self.merge}")
        pv = item.pixel_values
        dims = 3 if item.modality == "video" else 2
        if pv.dim() != dims or pv.shape[-2:] != (h * w, self.unit_dim):
            raise ValueError(f"{item.modality} pixel_values must be {'[slices, ' if dims == 3 else '['}"
                             f"h*w={h * w}, {self.unit_dim}], got {tuple(pv.shape)}")
        if item.num_patches != h * w:
            raise ValueError(f"num_patches={item.num_patches} but grid_hw {grid} has {h * w} patches")

    def make_pixels(self, h: int, w: int, slices: int | None = None, *, pin: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Random processor-layout pixels ``[h*w, 1176]`` (or ``[slices, h*w, 1176]``) in the tower's dtype."""
        shape = (h * w, self.unit_dim) if slices is None else (slices, h * w, self.unit_dim)
        pixels = torch.randn(shape, generator=generator).to(self.dtype)
        return pixels.pin_memory() if pin else pixels

    def example_request(self, rng: random.Random) -> list[EncodeItem]:
        """A benchmark request: 50 % one image, 30 % 2-3 images, 20 % a 16-frame 224 px video (8 slices).

        Image grids are 224-504 px (256-1024 patches, some non-square). Pixels come from a small
        cached pool (pinned on CUDA); ``key`` stays None (no dedup)."""
        u = rng.random()
        if u < 0.2:
            return [EncodeItem(rng.choice(self._pool((16, 16), 8)), 256, "video", meta={"grid_hw": (16, 16)})]
        items = []
        for _ in range(1 if u < 0.7 else rng.randint(2, 3)):
            grid = rng.choice(EXAMPLE_GRIDS)
            items.append(EncodeItem(rng.choice(self._pool(grid)), grid[0] * grid[1], meta={"grid_hw": grid}))
        return items

    def _pool(self, grid: tuple[int, int], slices: int | None = None) -> list[torch.Tensor]:
        key = (*grid, slices)
        if key not in self._pools:
            gen = torch.Generator().manual_seed(hash(key) & 0xFFFF)
            self._pools[key] = [self.make_pixels(*grid, slices, pin=self.device.type == "cuda", generator=gen)
                                for _ in range(2 if slices else 4)]
        return self._pools[key]

    def probe_units(self, patches: int) -> list[EncodeItem]:
        """About ``patches`` patches of 32x32-patch (448 px) images, for bytes-per-patch calibration."""
        side = 32 if patches >= 1024 else 8
        pin = self.device.type == "cuda"
        return [EncodeItem(self.make_pixels(side, side, pin=pin), side * side, meta={"grid_hw": (side, side)})
                for _ in range(max(1, round(patches / (side * side))))]

    @property
    def probe_patch_counts(self) -> list[int]:
        """Probe sizes (in patches) that calibration sweeps: 4 to 32 images of 448x448."""
        return [1024 * n for n in (4, 8, 16, 32)]

    # --- forward -----------------------------------------------------------------------------
    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        """Pack all units into one sequence, run the model once, split the merged output per unit."""
        grids = [(int(u.meta["grid_hw"][0]), int(u.meta["grid_hw"][1])) for u in units]
        window_index, full, windows, positions = self._pack(grids)
        dev = self.device
        pixels = stage([u.pixel_values for u in units], dev, self.dtype, concat=True)
        block_index = _to_device(window_index, dev)
        seq = pixels.shape[0]
        m = self.model
        hidden = m.patch_embed(pixels)
        unit = self.merge * self.merge
        hidden = hidden.reshape(seq // unit, unit, -1)[block_index].reshape(seq, -1)
        cos, sin = self._rotary(_to_device(positions, dev))
        attn_args = {kind: self._attention_args(segments) for kind, segments in (("full", full), ("window", windows))}
        for layer, block in enumerate(m.blocks):
            args = attn_args["full" if layer in self.full_attention_layers else "window"]
            hidden = hidden + self._attend(block.attn, block.norm1(hidden), cos, sin, args)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = m.merger(hidden)
        merged = merged[torch.argsort(block_index)]
        return handed_off(torch.split(merged, [h * w // unit for h, w in grids], dim=0), self.consumer_stream)

    def _pack(self, grids: list[tuple[int, int]]) -> tuple[np.ndarray, _Segments, _Segments, np.ndarray]:
        """Concatenate cached per-grid plans into batch-level indices (host only, no device sync)."""
        plans = [self._unit_plan(h, w) for h, w in grids]
        unit = self.merge * self.merge
        block_offsets = np.cumsum([0] + [h * w // unit for h, w in grids])[:-1]
        window_index = np.concatenate([p.window_index + off for p, off in zip(plans, block_offsets, strict=True)])
        image_lens = np.array([h * w for h, w in grids])
        window_lens = np.concatenate([p.window_lens for p in plans])
        full = _Segments(np.concatenate([[0], np.cumsum(image_lens)]).astype(np.int32), int(image_lens.max()))
        windows = _Segments(np.concatenate([[0], np.cumsum(window_lens)]).astype(np.int32), int(window_lens.max()))
        positions = np.concatenate([p.positions for p in plans])
        # tokens move with their merge block into window order
        positions = positions.reshape(-1, unit, 2)[window_index].reshape(-1, 2)
        return window_index, full, windows, positions

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one tower per process; grids repeat
    def _unit_plan(self, h: int, w: int) -> _UnitPlan:
        """The model's window partition and rotary positions for one (1, h, w) grid."""
        m, wb = self.merge, self.window_blocks
        bh, bw = h // m, w // m
        index = np.arange(bh * bw).reshape(bh, bw)
        pad_h, pad_w = (-bh) % wb, (-bw) % wb
        padded = np.pad(index, ((0, pad_h), (0, pad_w)), constant_values=-1)
        nh, nw = padded.shape[0] // wb, padded.shape[1] // wb
        tiles = padded.reshape(nh, wb, nw, wb).transpose(0, 2, 1, 3).reshape(nh * nw, wb * wb)
        lens = (tiles >= 0).sum(axis=1)
        order = tiles[tiles >= 0]
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (bh, m, bw, m)
        positions = np.stack([rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1),
                              cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)], axis=-1)
        return _UnitPlan(order, lens[lens > 0] * m * m, positions)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D rotary angles (row half, column half), as the model's vision rotary embedding builds them."""
        freqs = (positions[..., None].float() * self.inv_freq).flatten(1)  # [seq, 2 * head_dim/4]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[:, None, :], emb.sin()[:, None, :]

    def _attention_args(self, segments: _Segments) -> dict:
        if self.attention == "varlen":
            return {"cu": _to_device(segments.cu_seqlens, self.device), "max_len": segments.max_len}
        return {"groups": [_to_device(idx, self.device) for idx in segments.groups]}

    def _attend(self, attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                args: dict) -> torch.Tensor:
        """The model's attention block, over packed sequences that must not see each other."""
        seq = x.shape[0]
        q, k, v = attn.qkv(x).reshape(seq, 3, self.num_heads, self.head_dim).unbind(1)
        q = _rotate(q, cos, sin)
        k = _rotate(k, cos, sin)
        if "cu" in args:
            out = varlen_attn(q, k, v.contiguous(), args["cu"], args["cu"], args["max_len"], args["max_len"])
        else:
            out = torch.empty_like(q)
            for idx in args["groups"]:  # [n, length] token positions of n equal-length sequences
                qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # [n, heads, length, head_dim]
                out[idx] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
        return attn.proj(out.reshape(seq, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in float32, as ``apply_rotary_pos_emb_vision`` does."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host index array -> device tensor through pinned memory, without blocking the host."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
