"""CUDA graphs of Gemma 4's vision tower and projection, one per batch size of images of one patch count,
captured at start-up and replayed on the coalescer's stream (or, for an idle prefill's inline encode, on the
scheduler's).

Why: the tower launches ~1,000 small kernels a forward (16 blocks of clamped projections, per-head norms, 2-D rope,
gated MLP). In the real server its forwards were paced by the host: 31-39 ms of a 32-40 ms forward went to
launching them (README, point 4), for 1.5 images of ~1 TFLOP each. A replay launches them at once.

Gemma 4's shapes make this simple: the processor pads every image of one soft-token budget to ``P`` patches
(280 tokens -> ``P = 2520`` at a 3x3 pooling kernel), so a batch is ``[b, P, 3*16*16]`` pixels with ``[b, P, 2]``
position ids, and one graph per ``b`` holds any batch of ``b`` such images. A batch is padded with images
whose patches are all padding (position -1): the triton vision backend attends within each image only (the 4-D
mask SGLang also passes is ignored by it), so a padding image changes no real one, and its rows are dropped.
The graph also runs ``embed_vision`` on every pooled slot; the pooler's mask picks the real ones after the replay,
as SGLang's ``get_image_feature`` does per image (the rows and their counts are read once a replay, not per image).
The host waits for that read before the next replay may start, so replays never overlap.

Images of another ``P`` (another token budget, or video frames at 70 tokens) run the tower eagerly. Only SGLang's
``triton_attn`` vision backend is captured, with the per-layer ``max_seqlen`` read-back removed
(``vision_attention.pass_uniform_max_seqlen``); TP-sharded towers are not (their collectives would be captured).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .vision_attention import pass_uniform_max_seqlen
from .vit_graphs import CAPTURABLE_BACKEND, CapturedForwards

REPLAY_IMAGES = 0.25
"""What one more replay costs, counted in padded images: a replay's fixed host work (the input copies, the mask read)
against ~3-4 ms of tower time per 2,520-patch image. An estimate; it only breaks ties between fewer, fuller runs
and more, tighter ones."""


def batch_runs(count: int, sizes: Sequence[int], replay_images: float = REPLAY_IMAGES) -> list[tuple[int, int]]:
    """Consecutive runs ``(start, stop)`` of ``count`` images, each replayed at the smallest captured size that holds
    it, that replay the fewest images in all (``replay_images`` more per run): 5 images with sizes 1, 2, 3 are 3 + 2,
    not 3 + 3 padded. Empty when ``sizes`` is."""
    if not sizes or count <= 0:
        return []
    ordered = sorted(set(sizes))
    best: list[float] = [0.0] + [float("inf")] * count
    last: list[int] = [0] * (count + 1)
    for done in range(1, count + 1):
        for take in range(1, min(done, ordered[-1]) + 1):
            padded = next(size for size in ordered if size >= take)
            cost = best[done - take] + padded + replay_images
            if cost < best[done]:
                best[done], last[done] = cost, take
    runs, stop = [], count
    while stop > 0:
        runs.append((stop - last[stop], stop))
        stop -= last[stop]
    return runs[::-1]


class _Batch:
    """One batch size's static inputs (views of shared buffers), its graph and its outputs."""

    def __init__(self, images: int, pixels: torch.Tensor, positions: torch.Tensor) -> None:
        self.images = images
        self.pixels, self.positions = pixels[:images], positions[:images]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: tuple[torch.Tensor, torch.Tensor] | None = None  # projected [b, L, text hidden], mask [b, L]
        self.segments: torch.Tensor | None = None
        """SGLang's ``cu_seqlens`` of this shape, which the graph reads: SGLang caches it in an ``lru_cache`` that may
        drop it, so it is held here for the life of the graph."""

    def load(self, pixels: torch.Tensor | None, positions: torch.Tensor | None) -> None:
        """Write a batch (or, for warm-up and capture, none) on the current stream; the rest are padding images."""
        n = 0 if pixels is None else pixels.shape[0]
        if pixels is not None:
            self.pixels[:n].copy_(pixels, non_blocking=True)
            self.positions[:n].copy_(positions, non_blocking=True)
        self.pixels[n:].zero_()
        self.positions[n:].fill_(-1)


class Gemma4VisionGraphs(CapturedForwards):
    """Graphs of one Gemma 4 model's vision tower and ``embed_vision`` for batches of ``images`` images of
    ``patches`` patches each; see the module docstring."""

    def __init__(self, model: nn.Module, patches: int, images: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.patches = patches
        self.sizes = sorted({int(b) for b in images if int(b) > 0})
        self._batches: list[_Batch] = []

    @staticmethod
    def why_not(model: nn.Module) -> str | None:
        """Why this tower's forward cannot be captured, or None."""
        backend = type(getattr(model.vision_tower.encoder.layers[0].self_attn, "qkv_backend", None)).__name__
        if backend != CAPTURABLE_BACKEND:
            return f"its vision attention backend is {backend}; graphs need --mm-attention-backend triton_attn"
        if not model.vision_tower.device.type == "cuda":
            return "the tower is not on CUDA"
        return None

    def _forward(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """SGLang's ``get_image_feature`` on the static inputs, with ``embed_vision`` over every pooled slot."""
        pooled, mask = self.model.vision_tower(batch.pixels, batch.positions)
        return self.model.embed_vision(inputs_embeds=pooled), mask

    def capture(self) -> int:
        """Capture every batch size into one pool (``_capture_pool``); returns the bytes the pool holds."""
        from sglang.srt.layers.attention import vision

        pass_uniform_max_seqlen(self.model.vision_tower)  # no .item() read-back: it cannot be captured
        vt = self.model.vision_tower
        device = vt.device
        width = 3 * int(vt.patch_size) ** 2
        largest = self.sizes[-1]
        with torch.inference_mode():
            pixels = torch.zeros(largest, self.patches, width, device=device, dtype=self.model.language_model.dtype())
            positions = torch.full((largest, self.patches, 2), -1, device=device, dtype=torch.long)
            batches = [_Batch(b, pixels, positions) for b in self.sizes]
            for batch in batches:
                batch.segments = vision._get_cu_seqlens_for_shape(batch.images, self.patches, device=device)
            pool_bytes = self._capture_pool(device, batches, lambda b: b.load(None, None), self._forward)
        self._batches = batches
        return pool_bytes

    def runs(self, count: int) -> list[tuple[int, int]]:
        """How ``count`` images of this patch count are cut into replays (``batch_runs``)."""
        return batch_runs(count, self.sizes)

    def _replay(self, pixels: torch.Tensor, positions: torch.Tensor) -> list[torch.Tensor] | None:
        """Each image's projected soft tokens (its pooler-mask rows), by the smallest batch size that holds it."""
        n = pixels.shape[0]
        batch = next((b for b in self._batches if b.images >= n), None)
        if batch is None or n == 0 or pixels.dim() != 3 or pixels.shape[1] != self.patches:
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            with torch.inference_mode():  # the static buffers are inference tensors; SGLang's thread runs no_grad
                stream = torch.cuda.current_stream(batch.pixels.device)
                if self._queued_elsewhere(stream):
                    return None
                batch.load(pixels, positions)
                try:
                    batch.graph.replay()
                    projected, mask = batch.output
                    real = mask[:n]
                    rows = projected[:n][real]  # a fresh tensor: the graph's memory is reused by the next replay
                    counts = real.sum(dim=-1).tolist()
                finally:  # also when the copy-out fails (out of memory): the replay is queued either way
                    self._replayed(stream)
                return list(rows.split(counts))
        finally:
            self._lock.release()


def images_per_bucket(buckets: Sequence[int], patches: int) -> list[int]:
    """Batch sizes of ``patches``-patch images that the configured patch buckets (``vit_graph_patches``) hold."""
    return sorted({bucket // patches for bucket in buckets if bucket >= patches})

