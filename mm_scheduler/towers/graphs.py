"""CUDA-graph replay of a uniform tower's small batches (host-bound: launch time exceeds GPU time).

Why: at batch 1-4 a SigLIP forward on an H100 spends more time launching kernels than running them
(batch 1: 8.6 ms eager, 4.5 ms replayed). The coalescer's buckets make every forward of a uniform
(``ragged=False``) tower one pixel shape, so a graph per (pixel shape, padded batch size) covers it.

How: :class:`GraphedTower` wraps a tower and, per key, runs the first forward eagerly (the warm-up
that lazy kernel / cuBLAS initialisation needs), captures the tower's own ``forward`` on static input
tensors at the second use, then replays. A batch of ``n <= max_batch`` units is padded to the next
captured size (1, 2, 4, ...): its pixels are copied into the static inputs on the current stream, the
graph is replayed on the current stream and each unit's output row is cloned out, so the results own
their memory (the next replay overwrites the static outputs). Anything else runs eagerly: larger
batches, units with ``meta``, CPU, keys whose capture failed, or keys past the memory budget.

Memory: all graphs share one private pool (replays are serialised on one stream and only the static
outputs outlive a replay, which are held, so intermediates may be shared). The budget counts the
static inputs and the growth of reserved device memory during each capture (the pool's segments);
once spent, new keys stay eager.

Threading: ``forward`` runs on the coalescer's forward thread inside the executor's stream; the
executor already ordered that stream after the inputs' ``ready`` events. Capture runs on that stream
(or a private side stream if the current one is the default stream, where capture is illegal) with
``thread_local`` error mode so other threads' CUDA calls are unaffected. A second thread calling in
while one is inside ``forward`` (a health probe next to a hung forward) runs eagerly.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..types import EncodeItem, Tower
from ._staging import hand_off

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 512 << 20


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_pixels: torch.Tensor  # [padded, *pixel shape]
    static_outputs: list[torch.Tensor]
    bytes: int


@dataclass
class GraphStats:
    """Counters for tests and benchmarks (host-side, cheap)."""

    replays: int = 0
    captures: int = 0
    eager_forwards: int = 0
    failed_captures: int = 0
    over_budget: int = 0
    pool_bytes: int = 0
    keys: list[tuple[Any, ...]] = field(default_factory=list)


class GraphedTower:
    """A uniform tower whose forwards of up to ``max_batch`` units replay CUDA graphs.

    ``sizes``: captured padded batch sizes (powers of two up to ``max_batch`` by default).
    ``budget_bytes``: device memory the graphs may hold (static inputs + private pool growth).
    ``capture_after``: eager forwards of a key before it is captured (>= 1: the warm-up).
    """

    def __init__(self, tower: Tower, *, max_batch: int = 4, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 sizes: Sequence[int] | None = None, capture_after: int = 1) -> None:
        if getattr(tower, "ragged", True):
            raise ValueError("GraphedTower needs a uniform tower (ragged=False): a ragged forward has no static shape")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if capture_after < 1:
            raise ValueError("capture_after must be >= 1: the first forward of a shape is the warm-up")
        self.inner = tower
        self.ragged = False
        self.bytes_per_patch = tower.bytes_per_patch
        self.max_batch = max_batch
        self.sizes = tuple(sorted(sizes)) if sizes else tuple(1 << i for i in range(max_batch.bit_length())
                                                               if 1 << i <= max_batch)
        if self.sizes[-1] < max_batch:
            self.sizes = (*self.sizes, max_batch)
        self.budget_bytes = budget_bytes
        self.capture_after = capture_after
        self.device = torch.device(getattr(tower, "device", "cpu"))
        self.stats = GraphStats()
        self._graphs: dict[tuple[Any, ...], _Graph | None] = {}  # None: capture refused or failed
        self._uses: dict[tuple[Any, ...], int] = {}
        self._pool: Any = None
        self._pool_segments = 0
        self._side_stream: torch.cuda.Stream | None = None
        self._lock = threading.Lock()
        if self.device.type != "cuda":
            logger.info("GraphedTower: %s is not CUDA; every forward runs eagerly", self.device)

    def __getattr__(self, name: str) -> Any:  # validate, make_pixels, example_request, probe_units, ...
        return getattr(self.inner, name)

    @property
    def enabled(self) -> bool:
        return self.device.type == "cuda"

    def padded_size(self, n: int) -> int | None:
        """The captured batch size a batch of ``n`` units runs as, or None (eager)."""
        return next((s for s in self.sizes if s >= n), None)

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        """Group units by pixel shape; replay a graph per group where one fits, else run it eagerly."""
        if not self.enabled or not self._lock.acquire(blocking=False):
            self.stats.eager_forwards += 1
            return list(self.inner.forward(units))
        try:
            with torch.inference_mode():
                return self._forward(units)
        finally:
            self._lock.release()

    def _forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, unit in enumerate(units):
            pv = unit.pixel_values
            groups.setdefault((tuple(pv.shape), unit.num_patches, bool(unit.meta)), []).append(index)
        outputs: list[torch.Tensor] = [None] * len(units)  # type: ignore[list-item]
        for (shape, patches, has_meta), indices in groups.items():
            part = [units[i] for i in indices]
            padded = None if has_meta else self.padded_size(len(part))
            entry = None if padded is None else self._entry((shape, patches, padded), part)
            if entry is None:
                self.stats.eager_forwards += 1
                results = list(self.inner.forward(part))
            else:
                results = self._replay(entry, part)
            for index, out in zip(indices, results, strict=True):
                outputs[index] = out
        return outputs

    def _entry(self, key: tuple[Any, ...], part: list[EncodeItem]) -> _Graph | None:
        if key in self._graphs:
            return self._graphs[key]
        uses = self._uses.get(key, 0)
        if uses < self.capture_after:
            self._uses[key] = uses + 1
            return None  # the warm-up forward runs eagerly
        self._graphs[key] = graph = self._capture(key, part[0])
        return graph

    def _capture(self, key: tuple[Any, ...], sample: EncodeItem) -> _Graph | None:
        shape, patches, padded = key
        dtype = getattr(self.inner, "dtype", sample.pixel_values.dtype)
        input_bytes = padded * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        # Intermediates freed by earlier captures are reused from the shared pool: only growth beyond it counts.
        activations = max(0, int(self.bytes_per_patch) * patches * padded - self._pool_segments)
        if self.stats.pool_bytes + input_bytes + activations > self.budget_bytes:
            self.stats.over_budget += 1
            logger.info("GraphedTower: key %s stays eager: graphs hold %d B, need about %d B more, budget %d B",
                        key, self.stats.pool_bytes, input_bytes + activations, self.budget_bytes)
            return None
        current = torch.cuda.current_stream(self.device)
        on_default = current == torch.cuda.default_stream(self.device)
        if on_default and self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        stream = self._side_stream if on_default else current
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static = torch.zeros((padded, *shape), device=self.device, dtype=dtype)
        before = torch.cuda.memory_reserved(self.device)
        static_units = [EncodeItem(static[i], patches) for i in range(padded)]
        graph = torch.cuda.CUDAGraph()
        if stream is not current:
            stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    outs = list(self.inner.forward(static_units))
                finally:
                    graph.capture_end()
        except Exception as exc:  # an uncapturable forward: this key stays eager, the tower keeps serving
            self.stats.failed_captures += 1
            logger.warning("GraphedTower: capture of %s failed (%r); that shape runs eagerly", key, exc)
            return None
        finally:
            if stream is not current:
                current.wait_stream(stream)
        growth = max(0, torch.cuda.memory_reserved(self.device) - before)
        self._pool_segments += growth
        used = input_bytes + growth
        self.stats.pool_bytes += used
        self.stats.captures += 1
        self.stats.keys.append(key)
        logger.debug("GraphedTower: captured %s (%d B)", key, used)
        return _Graph(graph, static, outs, used)

    def _replay(self, entry: _Graph, part: list[EncodeItem]) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream(self.device)
        static = entry.static_pixels
        for row, unit in enumerate(part):
            src = unit.pixel_values
            if src.device.type == "cpu":
                if not src.is_pinned():
                    src = src.pin_memory()
                static[row].copy_(src, non_blocking=True)
            else:
                src.record_stream(stream)
                static[row].copy_(src)
        entry.graph.replay()
        self.stats.replays += 1
        consumer = getattr(self.inner, "consumer_stream", None)
        outputs = []
        for row in range(len(part)):
            out = entry.static_outputs[row].clone()  # owns its memory: the next replay overwrites the static one
            hand_off(out, consumer)
            outputs.append(out)
        return outputs


def graphed(tower: Tower, enable: bool = True, **kw: Any) -> Tower:
    """``GraphedTower(tower, **kw)`` when ``enable`` and the tower is uniform and on CUDA; else ``tower``."""
    if not enable or getattr(tower, "ragged", True) or torch.device(getattr(tower, "device", "cpu")).type != "cuda":
        return tower
    return GraphedTower(tower, **kw)


__all__ = ["DEFAULT_BUDGET_BYTES", "GraphStats", "GraphedTower", "graphed"]
