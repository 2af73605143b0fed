"""CUDA graphs of a Qwen vision tower, one per patch-count bucket, captured at start-up and replayed
on the coalescer's stream (or, for an idle prefill's inline encode, on the scheduler's).

Why: a Qwen2.5-VL-7B forward launches ~1,400 kernels from Python. On the coalescer's thread those
launches compete with the scheduler's for the GIL, which is where the plugin lost time in the real
server (README, "Where the time goes"). A replay launches the whole tower at once.

Why not SGLang's own runner (``SGLANG_VIT_ENABLE_CUDA_GRAPH``, ``multimodal/vit_cuda_graph_runner.py``):
it captures lazily on whichever thread first sees a layout (a capture beside the scheduler's kernels),
keeps one graph per layout with no bound, returns views of its static output, and on 0.5.16 keys a graph
by total length only, so a later batch of equal length but other image sizes replays the first batch's
``cu_seqlens``. Here:

* Graphs are captured once, before serving, for a few buckets of patches; all share one memory pool
  (replays are serialised), so the capture costs about the largest bucket's activations.
* A batch is padded to the smallest bucket that holds it. The padding is attention segments of its
  own (varlen attention never crosses segments) and unused segment slots are empty segments, which
  SGLang's triton varlen kernel skips (it also feeds one itself: Qwen2.5-VL's ``cu_seqlens`` start
  with two zeros). Segment boundaries live in static buffers rewritten before every replay; each
  layer's ``max_seqlen`` is fixed at capture to the bucket's bound.
* Results are copied out of the graph's memory before ``run`` returns; a batch no bucket holds
  returns None and the caller runs the tower's own forward, as does one submitted on another stream
  while a replay is still queued on the first (replays share one pool and never run side by side).
* The pool is memory on top of the coalescer's budget, held for the life of the server.

Only SGLang's ``triton_attn`` vision backend is captured (it takes the precomputed metadata and
never reads a device value on the host); TP-sharded towers are not (their collectives would be
captured too).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CAPTURABLE_BACKEND = "VisionTritonAttention"


@dataclass(frozen=True, slots=True)
class Bucket:
    """A captured shape: ``patches`` rows, room for ``full_segments`` full-attention segments of at most
    ``full_max`` rows and ``window_segments`` window segments of at most ``window_max`` (Qwen2.5-VL)."""

    patches: int
    full_segments: int
    full_max: int
    window_segments: int
    window_max: int

    @property
    def images(self) -> int:
        """Single-segment units (images) that always fit its segments, however small: the segment slots less
        the most its padding can take."""
        return self.full_segments - -(-self.patches // self.full_pad_max)

    @property
    def full_pad_max(self) -> int:
        """Longest full-attention segment the padding is cut into: attention cost grows with its square."""
        return min(self.full_max, SHORT_SEGMENT)


SHORT_SEGMENT = 1280
"""Longest segment of the short class (a 490-560 px square image: 1,225 patches at 14 px, Qwen2.5-VL, or
16 px, Qwen3-VL). SGLang's varlen kernel launches segments x heads x ceil(max_seqlen / 128) programs, so
a graph captured for a long ``max_seqlen`` runs mostly idle programs on batches of ordinary images."""
LONGEST_SEGMENT = 8192
"""Longest segment of the long class (a 1,268 px square image at 14 px patches); longer ones run eagerly."""


def make_buckets(patches: Sequence[int], window_max: int | None) -> list[Bucket]:
    """Every bucket of these patch counts, smallest first: each in a short class and, where it can hold a
    longer segment, a long class. Segment room: the padding's segments, and one per 512 rows plus one for
    the images (a 480 px image has 900-1,156 rows), so any ``count // 512 + 1`` images that fit in rows fit
    in segments too; for Qwen2.5-VL's windows (at most ``window_max`` rows each) one per 32 rows, and the
    padding's."""
    out = []
    for count in sorted(set(patches)):
        windows = 0 if window_max is None else count // 32 + -(-count // window_max)
        for longest in sorted({min(count, SHORT_SEGMENT), min(count, LONGEST_SEGMENT)}):
            pad_segments = -(-count // min(longest, SHORT_SEGMENT))
            out.append(Bucket(count, count // 512 + 1 + pad_segments, longest, windows, window_max or 0))
    return out


REPLAY_ROWS = 256
"""What one more replay costs, counted in padded rows: about 2 ms of tower time at the ~9 us a row measured on
the H200 (Qwen3-VL-8B, README). It stands for a replay's fixed host work (the eager prologue, the metadata
copies) and is an estimate, not a measurement; it only breaks ties between fewer, fuller runs and more, tighter ones."""


def cut_into_runs(rows: Sequence[int], buckets: Sequence[Bucket], replay_rows: int = REPLAY_ROWS
                  ) -> list[tuple[int, int]]:
    """Consecutive runs of units (``rows`` each, in order) that replay the fewest rows in all: a run costs the
    smallest bucket holding its rows, its units (``Bucket.images``) and its longest unit (``full_max``) plus
    ``replay_rows``; a unit no bucket holds is a run of its own at its own rows (the tower runs it). Why: one run
    padded to the next bucket can waste a third of its rows (13 images of 900 rows in 16,384), two runs (8,192
    and 4,096) about 5 %."""
    shapes = sorted({(b.patches, b.images, b.full_max) for b in buckets})
    largest = max((size for size, _, _ in shapes), default=0)
    most_units = max((images for _, images, _ in shapes), default=0)
    ends = [0]
    for n in rows:
        ends.append(ends[-1] + n)
    best: list[float] = [0.0] + [float("inf")] * len(rows)
    start_of = [0] * (len(rows) + 1)
    for stop in range(1, len(rows) + 1):
        longest = 0
        for start in range(stop - 1, -1, -1):
            total, count, longest = ends[stop] - ends[start], stop - start, max(longest, rows[start])
            if count > 1 and (total > largest or count > most_units):
                break  # earlier starts only add rows and units
            padded = next((size for size, images, full_max in shapes
                           if total <= size and count <= images and longest <= full_max), None)
            if padded is None and count > 1:
                continue
            cost = best[start] + (total if padded is None else padded) + replay_rows
            if cost < best[stop]:
                best[stop], start_of[stop] = cost, start
    runs, stop = [], len(rows)
    while stop > 0:
        runs.append((start_of[stop], stop))
        stop = start_of[stop]
    return runs[::-1]


def padded_lengths(lengths: Sequence[int], total: int, capacity: int, longest: int,
                   pad_longest: int | None = None) -> list[int] | None:
    """Segment lengths filling ``total`` rows in ``capacity`` slots: ``lengths``, then the padding cut
    into segments of at most ``pad_longest`` (default ``longest``) rows, then empty segments. None if
    they do not fit."""
    if any(n > longest for n in lengths):
        return None
    pad = total - sum(lengths)
    if pad < 0:
        return None
    chunk = pad_longest or longest
    pads = [chunk] * (pad // chunk) + ([pad % chunk] if pad % chunk else [])
    out = list(lengths) + pads
    if len(out) > capacity:
        return None
    return out + [0] * (capacity - len(out))


def patch_width(visual: nn.Module) -> int:
    """Values in one row of a Qwen tower's pixel input: channels x temporal patch x patch area."""
    embed = visual.patch_embed
    return int(embed.in_channels) * int(embed.temporal_patch_size) * int(embed.patch_size) ** 2


Layout = tuple[list[int], list[int] | None]
"""Padded full-attention and window segment lengths of one batch in one bucket."""


def _write(dest: torch.Tensor, values: torch.Tensor) -> None:
    """Copy host ``values`` into ``dest`` on the current stream without blocking the host: from pageable memory
    CUDA would first wait for everything queued on the stream (a replay's inputs must not cost that)."""
    dest.copy_(values.pin_memory() if dest.is_cuda else values, non_blocking=True)


def _lengths(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _cumulative(lengths: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = _lengths(lengths).cumsum(0)
    return out


@dataclass(slots=True)
class Prepared:
    """A batch after the tower's eager prologue: rows in attention order, rotary tables, segment
    lengths, and how to put the merged output rows back in input order (None: already in order)."""

    rows: torch.Tensor
    rotary: tuple[torch.Tensor, torch.Tensor]
    full_lengths: list[int]
    window_lengths: list[int]
    unpermute: torch.Tensor | None


class _Static:
    """One bucket's static inputs (views of shared buffers), its metadata buffers and its graph."""

    def __init__(self, bucket: Bucket, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 metadata_cls: type) -> None:
        device = rows.device
        self.bucket = bucket
        self.rows, self.cos, self.sin = rows[:bucket.patches], cos[:bucket.patches], sin[:bucket.patches]
        self.full_cu = torch.zeros(bucket.full_segments + 1, dtype=torch.int32, device=device)
        self.full_len = torch.zeros(bucket.full_segments, dtype=torch.int32, device=device)
        self.full = metadata_cls(cu_seqlens=self.full_cu, seq_lens=self.full_len, max_seqlen=bucket.full_max)
        self.window = None
        if bucket.window_segments:
            self.window_cu = torch.zeros(bucket.window_segments + 1, dtype=torch.int32, device=device)
            self.window_len = torch.zeros(bucket.window_segments, dtype=torch.int32, device=device)
            self.window = metadata_cls(cu_seqlens=self.window_cu, seq_lens=self.window_len,
                                       max_seqlen=bucket.window_max)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def layout(self, full: Sequence[int], window: Sequence[int] | None) -> Layout | None:
        b = self.bucket
        full_padded = padded_lengths(full, b.patches, b.full_segments, b.full_max, b.full_pad_max)
        if full_padded is None:
            return None
        if self.window is None:
            return full_padded, None
        window_padded = padded_lengths(window or [], b.patches, b.window_segments, b.window_max)
        return None if window_padded is None else (full_padded, window_padded)

    def load(self, prepared: Prepared | None, full: list[int], window: list[int] | None) -> None:
        """Write a batch (or, for warm-up and capture, zeros) into the static buffers, on the current stream."""
        n = 0 if prepared is None else prepared.rows.shape[0]
        if prepared is not None:
            self.rows[:n].copy_(prepared.rows)
            self.cos[:n].copy_(prepared.rotary[0])
            self.sin[:n].copy_(prepared.rotary[1])
        self.rows[n:].zero_()
        self.cos[n:].zero_()
        self.sin[n:].zero_()
        _write(self.full_cu, _cumulative(full))
        _write(self.full_len, _lengths(full))
        if self.window is not None:
            _write(self.window_cu, _cumulative(window))
            _write(self.window_len, _lengths(window))


@dataclass(frozen=True, slots=True)
class Replay:
    """One planned replay: the stream it is queued on, the graph, how its inputs are written and its results read."""

    stream: torch.cuda.Stream
    graph: torch.cuda.CUDAGraph
    load: Callable[[], None]
    read: Callable[[], Any]


class CapturedForwards:
    """What every tower's graphs share: captured into one pool before serving, replays serialised (one set of
    static buffers) and never queued beside a replay still pending on another stream, each forward counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_replay: torch.cuda.Event | None = None
        self._last_stream: torch.cuda.Stream | None = None
        self.replays = 0
        self.on_forward: Callable[[bool], None] | None = None
        """Told after every ``run`` whether a graph replayed the batch (the plugin counts it for ``/metrics``)."""

    def run(self, *inputs: torch.Tensor) -> Any:
        """The tower's output for a batch by a replay on the current stream, or None when no graph holds it (or
        another thread is replaying) and the caller should run the tower itself. Never the graph's memory."""
        out = self._replay(*inputs)
        if self.on_forward is not None:
            self.on_forward(out is not None)
        return out

    def _replay(self, *inputs: torch.Tensor) -> Any:
        raise NotImplementedError

    def _guarded_replay(self, plan: Callable[[], Replay | None]) -> Any:
        """Take the lock without waiting (None: another thread is replaying); under inference mode (the static
        buffers are inference tensors, SGLang's thread runs ``no_grad``) ``plan`` says what to replay (None: no graph
        holds the batch); decline while another stream's replay is queued (``_queued_elsewhere``); else load,
        replay and read out, recording the guard's event even when the read-out raises (out of memory): the replay
        is queued either way."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            with torch.inference_mode():
                replay = plan()
                if replay is None or self._queued_elsewhere(replay.stream):
                    return None
                replay.load()
                try:
                    replay.graph.replay()
                    return replay.read()
                finally:
                    self._replayed(replay.stream)
        finally:
            self._lock.release()

    @staticmethod
    def _capture_pool(device: torch.device, statics: Sequence[Any], idle: Callable[[Any], None],
                      body: Callable[[Any], Any]) -> int:
        """Capture ``body(static)`` for every static, largest (last) first, into one pool, each after an eager
        warm-up on ``idle`` inputs (triton compiles, cuBLAS picks its kernels); sets ``static.graph`` and
        ``static.output``; returns the bytes the pool holds. Call under ``inference_mode``, before serving, on
        the thread that owns the model: nothing else may run on the GPU while a capture is open."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=device)
        for static in reversed(statics):
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                idle(static)
                body(static)
            side.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side):
                static.output = body(static)
            static.graph = graph
        torch.cuda.synchronize(device)
        return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
                   if tuple(segment.get("segment_pool_id", ())) == tuple(pool))

    def _queued_elsewhere(self, stream: torch.cuda.Stream) -> bool:
        """True while the last replay is still queued on another stream: the scheduler's (an inline encode) or the
        coalescer's, possibly one the executor gave up on (``renew_stream`` after a hung forward). Waiting for it
        could hang this stream and the health probe too, so the caller runs this batch eagerly instead."""
        return self._last_replay is not None and self._last_stream != stream and not self._last_replay.query()

    def _replayed(self, stream: torch.cuda.Stream) -> None:
        """After a replay and its copy-out were queued on ``stream`` (call it even when the copy-out raised)."""
        self._last_replay, self._last_stream = torch.cuda.Event(), stream
        self._last_replay.record(stream)
        self.replays += 1


class QwenVisionGraphs(CapturedForwards):
    """Graphs of one Qwen vision tower (``model.visual``) for the given buckets; see the module docstring."""

    def __init__(self, visual: nn.Module, buckets: Sequence[int]) -> None:
        super().__init__()
        self.visual = visual
        self.windowed = hasattr(visual, "fullatt_block_indexes")  # Qwen2.5-VL: window attention between full layers
        window_max = None
        if self.windowed:
            side = visual.window_size // visual.spatial_merge_size // visual.patch_size * visual.spatial_merge_size
            window_max = side * side
            self._full_layers = {int(i) for i in torch.as_tensor(visual.fullatt_block_indexes).reshape(-1).tolist()}
        self.buckets = make_buckets(buckets, window_max)
        self._static: list[_Static] = []

    @staticmethod
    def why_not(visual: nn.Module) -> str | None:
        """Why this tower's forward cannot be captured, or None."""
        backend = type(getattr(visual.blocks[0].attn, "qkv_backend", None)).__name__
        if backend != CAPTURABLE_BACKEND:
            return f"its vision attention backend is {backend}; graphs need --mm-attention-backend triton_attn"
        if not next(visual.parameters()).is_cuda:
            return "the tower is not on CUDA"
        return None

    # --- the tower, as SGLang's forward runs it (sglang/srt/models/qwen2_5_vl.py, qwen3_vl.py) ---------
    def prepare(self, pixels: torch.Tensor, grids: torch.Tensor) -> Prepared:
        """The eager part of SGLang's ``forward`` before the blocks: patch embedding, positions, segments."""
        visual = self.visual
        x = visual.patch_embed(pixels.to(device=visual.device, dtype=visual.dtype))
        grid_list = [tuple(int(v) for v in row) for row in grids.tolist()]
        if not self.windowed:
            if visual._use_vectorized_pos_embed(len(grid_list)):
                x = x + visual.fast_pos_embed_interpolate_vectorized(grid_list)
            else:
                x = x + visual.fast_pos_embed_interpolate_from_list(grid_list)
            cos, sin = visual.rot_pos_emb(grid_list)
            frames = [h * w for t, h, w in grid_list for _ in range(t)]
            return Prepared(x, (cos, sin), frames, [], None)
        rotary = visual.rot_pos_emb(grids)
        window_index, cu_window = visual.get_window_index(grids)
        cu_window = torch.unique_consecutive(torch.tensor(cu_window, dtype=torch.int32))
        window_index = window_index.to(x.device)
        unit = visual.spatial_merge_unit
        rows = x.shape[0]
        x = x.reshape(rows // unit, unit, -1)[window_index].reshape(rows, -1)
        rotary = rotary.to(device=x.device, dtype=x.dtype).reshape(rows // unit, unit, -1)[window_index]
        emb = torch.cat((rotary.reshape(rows, -1),) * 2, dim=-1)
        unpermute = torch.empty_like(window_index)
        unpermute[window_index] = torch.arange(window_index.numel(), device=window_index.device)
        clips = [t * h * w for t, h, w in grid_list]
        return Prepared(x, (emb.cos().to(x.dtype), emb.sin().to(x.dtype)), clips,
                        (cu_window[1:] - cu_window[:-1]).tolist(), unpermute)

    def _blocks(self, static: _Static) -> torch.Tensor:
        """Blocks and merger(s) on the static buffers: the part that is captured."""
        visual = self.visual
        x = static.rows.unsqueeze(1)
        if self.windowed:
            for index, block in enumerate(visual.blocks):
                meta = static.full if index in self._full_layers else static.window
                x = block(x, cu_seqlens=meta.cu_seqlens, position_embeddings=(static.cos, static.sin),
                          forward_metadata=meta)
            return visual.merger(x)
        deepstack = []
        for index, block in enumerate(visual.blocks):
            x = block(x, cu_seqlens=static.full.cu_seqlens, rotary_pos_emb_cos=static.cos,
                      rotary_pos_emb_sin=static.sin, forward_metadata=static.full)
            if index in visual.deepstack_visual_indexes:
                deepstack.append(visual.deepstack_merger_list[len(deepstack)](x))
        return torch.cat([visual.merger(x), *deepstack], dim=1)

    # --- capture and replay -------------------------------------------------------------------------------
    def allocate(self, device: torch.device) -> list[_Static]:
        """Static buffers of every bucket, smallest first; the row and rotary buffers are shared."""
        from sglang.srt.layers.attention.vision import VisionAttentionMetadata

        merge = self.visual.spatial_merge_size
        probe = self.prepare(torch.zeros(merge * merge, patch_width(self.visual), device=device),
                             torch.tensor([[1, merge, merge]]))
        largest = self.buckets[-1].patches
        rows = torch.zeros(largest, probe.rows.shape[-1], device=device, dtype=probe.rows.dtype)
        cos = torch.zeros(largest, probe.rotary[0].shape[-1], device=device, dtype=probe.rotary[0].dtype)
        sin = torch.zeros_like(cos)
        return [_Static(bucket, rows, cos, sin, VisionAttentionMetadata) for bucket in self.buckets]

    def capture(self) -> int:
        """Capture every bucket into one pool (``_capture_pool``); returns the bytes the pool holds."""
        device = next(self.visual.parameters()).device
        with torch.inference_mode():
            statics = self.allocate(device)
            pool_bytes = self._capture_pool(device, statics, lambda s: s.load(None, *s.layout([], [])), self._blocks)
        self._static = statics
        return pool_bytes

    def fit(self, statics: Sequence[_Static], prepared: Prepared) -> tuple[_Static, Layout] | None:
        """The smallest bucket holding the batch, with its padded segment lengths; None if none does."""
        rows = prepared.rows.shape[0]
        for static in statics:
            if static.bucket.patches >= rows:
                layout = static.layout(prepared.full_lengths, prepared.window_lengths)
                if layout is not None:
                    return static, layout
        return None

    def unpad(self, output: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """The batch's merged rows, in input order, in a tensor of their own."""
        merged = output[:prepared.rows.shape[0] // self.visual.spatial_merge_unit]
        return merged.index_select(0, prepared.unpermute) if prepared.unpermute is not None else merged.clone()

    def _replay(self, pixels: torch.Tensor, grids: torch.Tensor) -> torch.Tensor | None:
        """Packed merged rows of the batch, by the smallest bucket that holds it."""
        if not self._static or pixels.shape[0] > self._static[-1].bucket.patches:
            return None

        def plan() -> Replay | None:
            prepared = self.prepare(pixels, grids)
            chosen = self.fit(self._static, prepared)
            if chosen is None:
                return None
            static, layout = chosen
            return Replay(torch.cuda.current_stream(prepared.rows.device), static.graph,
                          lambda: static.load(prepared, *layout), lambda: self.unpad(static.output, prepared))

        return self._guarded_replay(plan)
