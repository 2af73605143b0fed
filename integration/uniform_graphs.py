"""CUDA graphs of towers whose every image has one input shape, one per batch size, captured at start-up and replayed
on the coalescer's stream (or, for an idle prefill's inline encode, on the scheduler's): Gemma 4's tower and
projection, and Gemma3's SigLIP and projector.

Why: such towers launch ~1,000 small kernels a forward (Gemma 4: 16 blocks of clamped projections, per-head norms,
2-D rope, gated MLP; SigLIP: 27 blocks). In the real server Gemma 4's forwards were paced by the host: 31-39 ms of a
32-40 ms forward went to launching them (README, point 4), for 1.5 images of ~1 TFLOP each. A replay launches them at
once.

Their shapes make this simple. Gemma 4's processor pads every image of one soft-token budget to ``P`` patches
(280 tokens -> ``P = 2520`` at a 3x3 pooling kernel): a batch is ``[b, P, 3*16*16]`` pixels with ``[b, P, 2]``
position ids. Gemma3 crops every image to SigLIP's one resolution: ``[b, 3, 896, 896]`` (4,096 patches). So one graph
per ``b`` holds any batch of ``b`` such images. A batch is padded with padding images (Gemma 4: every patch at
position -1; Gemma3: zero pixels): the triton vision backend attends within each image only (the 4-D mask Gemma 4
also passes is ignored by it), so a padding image changes no real one, and its rows are dropped. Gemma 4's graph also
runs ``embed_vision`` on every pooled slot; the pooler's mask picks the real ones after the replay, as SGLang's
``get_image_feature`` does per image (the rows and their counts are read once a replay, not per image). The host
waits for that read before the next replay may start, so Gemma 4's replays never overlap; Gemma3's outputs are copied
out on the stream and the guard's event keeps another stream off the pool until that copy is done.

Images of another shape (Gemma 4: another token budget, or video frames at 70 tokens) run the tower eagerly.
SGLang's ``triton_attn`` vision backend is captured, with the per-layer ``max_seqlen`` read-back removed
(``vision_attention.pass_uniform_max_seqlen``); SGLang's cached ``cu_seqlens`` of each shape is held by the graph that
reads it. Gemma3's SigLIP is also captured on SGLang's ``sdpa`` backend (``--mm-attention-backend sdpa``, cuDNN's or
torch's flash kernel, ~4x faster a crop than ``triton_attn`` on an H200): SigLIP hands its attention no ``cu_seqlens``,
so SDPA builds no mask and reads nothing back, and each crop of the batch attends within itself, so a zero crop pads
it. Gemma 4's tower on SDPA passes a mask that padding images would fill with fully masked rows, and takes one image a
forward where ``flatten_batch`` is set: it is not captured there. TP-sharded towers are not captured (their
collectives would be).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from mm_scheduler.executor import wait_asleep

from .vision_attention import pass_uniform_max_seqlen
from .vit_graphs import CAPTURABLE_BACKEND, CapturedForwards, Replay

REPLAY_IMAGES = 0.25
"""What one more replay costs, counted in padded images: a replay's fixed host work (the input copies, the read-out).
An estimate, not a measurement (a Gemma 4 image is ~12 ms of encoder-stream time in the real server, 5178309); it only
breaks ties between fewer, fuller runs and more, tighter ones."""


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

    def __init__(self, images: int, inputs: Sequence[torch.Tensor], padding: Sequence[float]) -> None:
        self.images = images
        self.inputs = [buffer[:images] for buffer in inputs]
        self._padding = padding
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: Any = None
        self.segments: torch.Tensor | None = None
        """SGLang's ``cu_seqlens`` of this shape, which the graph reads: SGLang caches it in an ``lru_cache`` that may
        drop it, so it is held here for the life of the graph."""

    def load(self, inputs: Sequence[torch.Tensor]) -> None:
        """Write a batch (or, for warm-up and capture, none) on the current stream; the rest are padding images."""
        n = inputs[0].shape[0] if inputs else 0
        for static, given, pad in zip(self.inputs, inputs or [None] * len(self.inputs), self._padding, strict=True):
            if given is not None:
                static[:n].copy_(given, non_blocking=True)
            static[n:].fill_(pad)


class UniformGraphs(CapturedForwards):
    """Graphs of one tower for batches of ``sizes`` images of ``patches`` patches each; see the module docstring.
    A subclass names the tower, its static inputs and their padding, the captured body and how rows are read out."""

    padding: tuple[float, ...]
    """Each static input's value in a padding image."""
    capturable_backends: ClassVar[dict[str, str]] = {CAPTURABLE_BACKEND: "triton_attn"}
    """SGLang's vision attention classes these graphs may capture, each with its ``--mm-attention-backend`` name
    (see the module docstring)."""

    def __init__(self, model: nn.Module, patches: int, sizes: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.patches = patches
        self.sizes = sorted({int(b) for b in sizes if int(b) > 0})
        self._batches: list[_Batch] = []

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def why_not(cls, model: nn.Module) -> str | None:
        """Why this tower's forward cannot be captured, or None."""
        tower = cls.tower(model)
        attentions = [m.qkv_backend for m in tower.modules() if hasattr(m, "qkv_backend")]
        backends = {type(a).__name__ for a in attentions}
        need = f"graphs need --mm-attention-backend {' or '.join(cls.capturable_backends.values())}"
        if len(backends) > 1:
            return f"its vision attention layers mix backends ({', '.join(sorted(backends))}); {need}"
        backend = next(iter(backends), None)
        if backend not in cls.capturable_backends:
            return f"its vision attention backend is {backend or 'unknown'}; {need}"
        if any(getattr(a, "flatten_batch", False) for a in attentions):
            return "its SDPA vision attention takes one image a forward (flatten_batch)"
        if next(tower.parameters()).device.type != "cuda":
            return "the tower is not on CUDA"
        return None

    def _static_inputs(self, largest: int, device: torch.device) -> list[torch.Tensor]:
        """Full-size static input buffers for ``largest`` images."""
        raise NotImplementedError

    def _forward(self, batch: _Batch) -> Any:
        """The captured body on the batch's static inputs."""
        raise NotImplementedError

    def _read(self, output: Any, n: int) -> list[torch.Tensor]:
        """The first ``n`` images' results in tensors of their own (never the graph's memory), queued on the stream."""
        raise NotImplementedError

    def capture(self) -> int:
        """Capture every batch size into one pool (``_capture_pool``); returns the bytes the pool holds."""
        from sglang.srt.layers.attention import vision

        tower = self.tower(self.model)
        pass_uniform_max_seqlen(tower)  # no .item() read-back: it cannot be captured
        device = next(tower.parameters()).device
        with torch.inference_mode():
            inputs = self._static_inputs(self.sizes[-1], device)
            batches = [_Batch(b, inputs, self.padding) for b in self.sizes]
            for batch in batches:
                batch.segments = vision._get_cu_seqlens_for_shape(batch.images, self.patches, device=device)
            pool_bytes = self._capture_pool(device, batches, lambda b: b.load([]), self._forward)
        self._batches = batches
        return pool_bytes

    def runs(self, count: int) -> list[tuple[int, int]]:
        """How ``count`` images of this shape are cut into replays (``batch_runs``)."""
        return batch_runs(count, self.sizes)

    def holds(self, *inputs: torch.Tensor) -> bool:
        """Whether these inputs have the captured per-image shapes (any count: ``runs`` cuts them)."""
        return bool(self._batches) and len(inputs) == len(self._batches[0].inputs) and all(
            given.shape[1:] == static.shape[1:] for given, static in zip(inputs, self._batches[0].inputs, strict=True))

    def _replay(self, *inputs: torch.Tensor) -> list[torch.Tensor] | None:
        """Each image's result, by the smallest batch size that holds the batch."""
        n = inputs[0].shape[0]
        batch = next((b for b in self._batches if b.images >= n), None)
        if batch is None or n == 0 or not self.holds(*inputs):
            return None
        return self._guarded_replay(lambda: Replay(torch.cuda.current_stream(batch.inputs[0].device), batch.graph,
                                                   lambda: batch.load(inputs), lambda: self._read(batch.output, n)))


class Gemma4VisionGraphs(UniformGraphs):
    """Gemma 4's vision tower and ``embed_vision``: ``[b, P, 3*16*16]`` pixels and ``[b, P, 2]`` position ids."""

    padding = (0.0, -1)

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        return model.vision_tower

    def _static_inputs(self, largest: int, device: torch.device) -> list[torch.Tensor]:
        width = 3 * int(self.model.vision_tower.patch_size) ** 2
        return [torch.zeros(largest, self.patches, width, device=device, dtype=self.model.language_model.dtype()),
                torch.full((largest, self.patches, 2), -1, device=device, dtype=torch.long)]

    def _forward(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """SGLang's ``get_image_feature`` on the static inputs, with ``embed_vision`` over every pooled slot."""
        pooled, mask = self.model.vision_tower(*batch.inputs)
        return self.model.embed_vision(inputs_embeds=pooled), mask

    def _read(self, output: tuple[torch.Tensor, torch.Tensor], n: int) -> list[torch.Tensor]:
        """Each image's projected soft tokens: its pooler-mask rows (this waits for the replay, asleep)."""
        projected, mask = output
        wait_asleep(projected)  # the mask index below would wait for the replay spinning a core
        real = mask[:n]
        rows = projected[:n][real]  # a fresh tensor: the graph's memory is reused by the next replay
        return list(rows.split(real.sum(dim=-1).tolist()))


class Gemma3VisionGraphs(UniformGraphs):
    """Gemma3's SigLIP and multimodal projector: ``[b, 3, S, S]`` crops at SigLIP's one resolution."""

    padding = (0.0,)
    capturable_backends: ClassVar[dict[str, str]] = {CAPTURABLE_BACKEND: "triton_attn", "VisionSdpaAttention": "sdpa"}

    @staticmethod
    def tower(model: nn.Module) -> nn.Module:
        return model.vision_tower

    def _static_inputs(self, largest: int, device: torch.device) -> list[torch.Tensor]:
        size = int(self.model.config.vision_config.image_size)
        return [torch.zeros(largest, 3, size, size, device=device, dtype=self.model.language_model.dtype())]

    def _forward(self, batch: _Batch) -> torch.Tensor:
        """SGLang's ``get_image_feature`` on the static crops: the tower, then the projector, batched."""
        return self.model.multi_modal_projector(self.model.vision_tower(pixel_values=batch.inputs[0]))

    def _read(self, output: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Each crop's ``[1, tokens, hidden]`` projected features, copied out on the stream."""
        return list(output[:n].clone().split(1, dim=0))


def images_per_bucket(buckets: Sequence[int], patches: int) -> list[int]:
    """Batch sizes of ``patches``-patch images that the configured patch buckets (``vit_graph_patches``) hold."""
    return sorted({bucket // patches for bucket in buckets if bucket >= patches})

