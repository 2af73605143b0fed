"""Serving benchmark: time-to-first-token and inter-token latency of an SGLang-shaped serving loop (issue 9).

A real SGLang server cannot run on the GPU machine, so this is the next most faithful thing:

* **Scheduler**: SGLang's ``event_loop_normal`` shape on one thread. Each iteration ingests the requests
  that have arrived (Poisson clock, fixed seed), then runs on the *forward stream* either a prefill of
  newly admitted requests (FIFO, at most ``--chunk-tokens`` prompt tokens and ``--max-running`` running
  requests; prefill goes before decode, as in SGLang) or one decode step of the running batch. The
  whole loop runs inside ``torch.cuda.stream(forward_stream)``: the scheduler thread's current stream is
  never the default stream, as in SGLang. Each step ends with the sampled ids copied to the host.
* **LLM**: real decoder layers with random bf16 weights of Qwen2.5-VL-7B's language model (hidden 3584,
  28 layers, 28 heads / 4 KV heads, intermediate 18944, vocab 152064): fused QKV with bias, RoPE, GQA
  attention (SDPA; prefill causal per request, decode over a slot-per-request KV cache), SwiGLU MLP,
  LM head and greedy sampling, so prefill and decode steps cost what they cost. Prefill is eager; decode
  replays CUDA graphs per (batch, KV span) bucket, as SGLang's ``CudaGraphRunner`` does (``--no-cuda-graph``).
* **Vision**: the project's real towers (``mm_scheduler.towers``: Qwen2.5-VL vision by default,
  ``--tower siglip-mixed`` with a linear projector), random weights, behind an ``SGLangTower`` subclass.
* **Plugin**: driven through ``integration/service.py``'s ``EncoderService`` exactly where SGLang calls
  it: ``on_arrival`` when a request enters the waiting queue, ``encode(items, original)`` as the hooked
  ``get_*_feature`` inside prefill, ``consumed`` after the prefill, ``release`` at finish.

Modes, same arrivals and seeds: ``inline`` (one encoder call per request inside its prefill),
``inline-batched`` (SGLang today: one call for all images of the prefill batch, one per video),
``plugin`` (the plugin as shipped with ``configs/qwen2_5_vl.yaml``: early encoding from arrival on the
coalescer's stream, the LLM's streams at the device's highest CUDA priority per the config's
``sglang.llm_stream_priority``, its ``prefill_wait_ms``), ``plugin-tuned`` (the same plus an admission
guard: while decode has work, a request whose early encode has not finished on the GPU waits in the
queue, up to ``--tuned-hold-ms``, instead of blocking the scheduler inside its prefill; this policy is
benchmark-side, the plugin does not ship it). ``--modes ...,plugin-equal-priority`` adds the plugin with
SGLang's priority-0 streams (ablation). Loads are fractions of ``inline``'s capacity, measured first in
the same run by a saturated burst.

    python -m benchmarks.serving_bench --out benchmarks/results     # CUDA (H100/H200), about 5 minutes
    python -m benchmarks.serving_bench --smoke --out /tmp/serving    # CPU, tiny models, seconds

Writes ``serving_bench.json`` (``{"device", "llm_shape", "rows"}``, one row per mode and load),
``serving_bench_meta.json`` (settings, inline capacity, the issue's target ratios), ``serving_bench.png``
(with matplotlib) and ``serving_bench_table.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import itertools
import random
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from mm_scheduler_sglang.adapters import SGLangTower
from mm_scheduler_sglang.service import EncoderService
from mm_scheduler_sglang.settings import PLUGIN_DEFAULTS
from mm_scheduler_sglang.settings import resolve as resolve_plugin

from benchmarks.harness import (
    Media,
    MediaMix,
    build_bench_tower,
    bytes_per_patch,
    device_name,
    format_table,
    latency_stats,
    log,
    markdown_table,
    pct,
    poisson_trace,
    progress,
    resolve,
    stream_ctx,
    write_json,
)
from mm_scheduler import CoalescerConfig, EncodeItem, config_from_dict, load_config
from mm_scheduler.units import assemble, split_into_units

MODES = ("inline", "inline-batched", "plugin", "plugin-tuned")
EXTRA_MODES = ("plugin-equal-priority",)  # the plugin with SGLang's priority-0 streams (--modes, an ablation)
LOADS = (0.2, 0.5, 0.8, 1.0, 1.2)
REPO = Path(__file__).resolve().parents[1]


# --- the LLM ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LLMShape:
    """A decoder-only LM's dimensions (Qwen2 family: GQA, SwiGLU, QKV bias)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 1_000_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def describe(self) -> str:
        return (f"{self.name}: hidden {self.hidden}, {self.layers} layers, {self.heads} heads / {self.kv_heads} KV "
                f"heads (head_dim {self.head_dim}), intermediate {self.intermediate}, vocab {self.vocab}")


QWEN2_5_VL_7B_LM = LLMShape("Qwen2.5-VL-7B language model", 3584, 28, 28, 4, 18944, 152064)
TINY_LM = LLMShape("tiny LM", 48, 2, 4, 2, 96, 512)  # hidden = the tiny Qwen tower's output width


class DecoderLM:
    """Qwen2-style decoder with random weights and a KV cache of one row ("slot") per running request.

    Why hand-written rather than transformers' generate(): continuous batching needs a packed prefill
    of new prompts of different lengths next to a batched decode whose members join and leave every
    step. Running requests hold slots ``0..B-1``; when one finishes, the last slot's cache rows move
    into the hole, so decode attention reads ``kv[:, :B, :, :L]`` as a view, with no gather.
    """

    def __init__(self, shape: LLMShape, device: torch.device, dtype: torch.dtype, max_slots: int,
                 max_len: int, seed: int = 0) -> None:
        self.shape, self.device, self.dtype = shape, device, dtype
        self.max_slots, self.max_len = max_slots, max_len
        self.group = shape.heads // shape.kv_heads
        hidden, hd, kvh = shape.hidden, shape.head_dim, shape.kv_heads
        self.splits = (hidden, kvh * hd, kvh * hd)
        gen = torch.Generator(device=device).manual_seed(seed)

        def weight(*size: int, std: float = 0.02) -> torch.Tensor:
            return torch.randn(*size, device=device, dtype=dtype, generator=gen).mul_(std)

        def ones() -> torch.Tensor:
            return torch.ones(hidden, device=device, dtype=dtype)

        with torch.inference_mode():
            self.layers = [{"ln1": ones(), "wqkv": weight(sum(self.splits), hidden), "bqkv": weight(sum(self.splits)),
                            "wo": weight(hidden, hidden), "ln2": ones(),
                            "wgu": weight(2 * shape.intermediate, hidden), "wd": weight(hidden, shape.intermediate)}
                           for _ in range(shape.layers)]
            self.embed = weight(shape.vocab, hidden)
            self.norm = ones()
            self.lm_head = weight(shape.vocab, hidden)
            self.kv = torch.zeros(shape.layers, 2, max_slots, kvh, max_len, hd, device=device, dtype=dtype)
            inv = 1.0 / shape.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
            freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
            self.cos, self.sin = freqs.cos().to(device), freqs.sin().to(device)
            self.rows = torch.arange(max_slots, device=device)

    @property
    def weight_bytes(self) -> int:
        tensors = [t for layer in self.layers for t in layer.values()] + [self.embed, self.norm, self.lm_head]
        return sum(t.numel() * t.element_size() for t in tensors)

    def h2d(self, values: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Host ints -> device through pinned memory: a pageable copy would make the host wait for the stream."""
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE in float32; ``x`` is ``[tokens, heads, head_dim]``, cos/sin ``[tokens, head_dim/2]``."""
        x1, x2 = x.float().chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    def _mlp(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = F.rms_norm(x, (self.shape.hidden,), p["ln2"], eps=1e-6)
        gate, up = F.linear(h, p["wgu"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, p["wd"])

    def prefill(self, slots: Sequence[int], x: torch.Tensor, lens: Sequence[int]) -> torch.Tensor:
        """Run packed prompts ``x [sum(lens), hidden]`` (request i owns ``slots[i]``); their last hidden states."""
        s = self.shape
        total, hd, kvh = x.shape[0], s.head_dim, s.kv_heads
        starts = list(itertools.accumulate(lens, initial=0))
        pos = self.h2d(torch.cat([torch.arange(n) for n in lens]))
        last = self.h2d(torch.tensor(starts[1:]) - 1)
        cos, sin = self.cos[pos], self.sin[pos]
        for layer, p in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,), p["ln1"], eps=1e-6)
            q, k, v = F.linear(h, p["wqkv"], p["bqkv"]).split(self.splits, dim=-1)
            q = self._rope(q.view(total, s.heads, hd), cos, sin)
            k = self._rope(k.view(total, kvh, hd), cos, sin)
            v = v.view(total, kvh, hd)
            cache = self.kv[layer]
            out = torch.empty_like(q)
            for slot, a, b in zip(slots, starts[:-1], starts[1:], strict=True):
                ks, vs = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # [kv_heads, n, head_dim]
                cache[0, slot, :, :b - a] = ks
                cache[1, slot, :, :b - a] = vs
                o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None],
                                                   ks.repeat_interleave(self.group, 0)[None],
                                                   vs.repeat_interleave(self.group, 0)[None], is_causal=True)
                out[a:b] = o[0].transpose(0, 1)
            x = x + F.linear(out.view(total, s.hidden), p["wo"])
            x = self._mlp(x, p)
        return x[last]

    def span_for(self, positions: Sequence[int], step: int = 64) -> int:
        """KV read width of a decode step: the longest sequence, padded to ``step``."""
        return min(self.max_len, -(-(max(positions) + 1) // step) * step)

    def decode(self, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """One eager step of the running batch in slots ``0..B-1``: ``ids[i]`` at ``positions[i]``; last hidden."""
        return self.decode_hidden(self.h2d(ids), self.h2d(positions), self.span_for(positions))

    def decode_hidden(self, ids_t: torch.Tensor, pos_t: torch.Tensor, span: int) -> torch.Tensor:
        """The decode step on device tensors only (no host sync), so a CUDA graph can capture it."""
        s = self.shape
        batch, hd, kvh = ids_t.shape[0], s.head_dim, s.kv_heads
        x = self.embed[ids_t]
        cos, sin = self.cos[pos_t], self.sin[pos_t]
        mask = (torch.arange(span, device=self.device)[None, :] <= pos_t[:, None])[:, None, None, :]
        rows = self.rows[:batch]
        for layer, p in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden,), p["ln1"], eps=1e-6)
            q, k, v = F.linear(h, p["wqkv"], p["bqkv"]).split(self.splits, dim=-1)
            q = self._rope(q.view(batch, s.heads, hd), cos, sin)
            k = self._rope(k.view(batch, kvh, hd), cos, sin)
            cache = self.kv[layer]
            cache[0][rows, :, pos_t] = k
            cache[1][rows, :, pos_t] = v.view(batch, kvh, hd)
            # GQA without copies: the query heads of one KV head become that head's "query positions".
            o = F.scaled_dot_product_attention(q.view(batch, kvh, self.group, hd), cache[0, :batch, :, :span],
                                               cache[1, :batch, :, :span], attn_mask=mask)
            x = x + F.linear(o.reshape(batch, s.hidden), p["wo"])
            x = self._mlp(x, p)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(F.rms_norm(hidden, (self.shape.hidden,), self.norm, eps=1e-6), self.lm_head)

    def sample(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy ids (on the device; the caller's ``tolist()`` is the step's host sync)."""
        return self.logits(hidden).argmax(dim=-1)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.kv[:, :, dst, :, :length] = self.kv[:, :, src, :, :length]


class DecodeGraphs:
    """CUDA graphs of the decode step per (padded batch size, KV span), as SGLang's ``CudaGraphRunner`` does.

    Why: an eager 28-layer step is ~700 kernel launches and host-bound; SGLang replays captured
    graphs, so its decode costs GPU time. Padding rows (beyond the live batch) write into free slots.
    """

    def __init__(self, llm: DecoderLM, span_step: int = 256) -> None:
        self.llm = llm
        top = llm.max_slots
        self.batches = sorted({b for b in (1, 2, 4, 8, *range(16, top + 1, 8)) if b <= top} | {top})
        self.spans = sorted({min(llm.max_len, s) for s in range(span_step, llm.max_len + span_step, span_step)})
        self.ids = torch.zeros(top, dtype=torch.long, device=llm.device)
        self.pos = torch.zeros(top, dtype=torch.long, device=llm.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(llm.device)
        with torch.inference_mode():
            for b in reversed(self.batches):
                for span in reversed(self.spans):
                    side.wait_stream(torch.cuda.current_stream(llm.device))
                    with torch.cuda.stream(side):  # warm-up outside the capture: workspaces, kernel choice
                        llm.decode_hidden(self.ids[:b], self.pos[:b], span)
                    torch.cuda.current_stream(llm.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                        out = llm.decode_hidden(self.ids[:b], self.pos[:b], span)
                    self.graphs[(b, span)] = (graph, out)
        torch.cuda.synchronize(llm.device)

    def decode(self, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Last hidden of the live rows (a view of the graph's output: read it before the next replay)."""
        n = len(ids)
        b = next(x for x in self.batches if x >= n)
        span = next(x for x in self.spans if x >= max(positions) + 1)
        host = torch.zeros(2, b, dtype=torch.long)
        host[0, :n] = torch.tensor(ids)
        host[1, :n] = torch.tensor(positions)
        dev = self.llm.h2d(host)
        self.ids[:b].copy_(dev[0])
        self.pos[:b].copy_(dev[1])
        graph, out = self.graphs[(b, span)]
        graph.replay()
        return out[:n]

    def check(self) -> float:
        """Relative difference of a replayed step against the eager step (same inputs, same cache)."""
        positions = [3, 40, min(self.llm.max_len - 1, 700)]
        ids = [1, 2, 3]
        with torch.inference_mode():
            graphed = self.decode(ids, positions).float().clone()
            eager = self.llm.decode(ids, positions).float()
        return float((graphed - eager).norm() / eager.norm().clamp_min(1e-6))


# --- the tower adapter ----------------------------------------------------------------------------
class Modality(enum.Enum):
    """SGLang's ``Modality`` as far as the adapter reads it (``item.modality.name``)."""

    IMAGE = 1
    VIDEO = 2


class ServedTower(SGLangTower):
    """The project's real tower behind the adapter interface ``EncoderService`` drives inside SGLang.

    Items are SGLang-shaped (``modality``, ``hash``, ``feature``, ``precomputed_embeddings``,
    ``offsets``, ``model_specific_data``). ``encode_direct`` is what the model's own ``get_*_feature``
    does today: one tower forward for the items it is given. Every forward is recorded (units,
    patches); for the tuned mode's admission guard the adapter also records which items' early
    encodes have completed on the GPU (one CUDA event per forward, polled without blocking).
    """

    def __init__(self, tower: Any, llm_hidden: int) -> None:
        super().__init__(tower.model)
        self.inner = tower
        self.ragged = tower.ragged
        self.bytes_per_patch = int(tower.bytes_per_patch)
        self.validate = tower.validate
        self.qwen = hasattr(tower, "merge")
        self.merge2 = tower.merge ** 2 if self.qwen else 1
        width = tower.config.out_hidden_size if self.qwen else tower.config.hidden_size
        self.projector: torch.nn.Linear | None = None
        if width != llm_hidden:  # SigLIP: a LLaVA-style linear projector into the LLM's width
            with torch.inference_mode():
                self.projector = torch.nn.Linear(width, llm_hidden, device=tower.device, dtype=tower.dtype)
        self.llm_hidden = llm_hidden
        self.elem_bytes = torch.empty((), dtype=tower.dtype).element_size()
        self.forwards: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._expected: dict[int, int] = {}
        self._done: dict[int, list[torch.cuda.Event | None]] = {}

    def _raw_pixels(self, item: Any, shape: torch.Size | None = None) -> bool:
        video = item.modality.name == "VIDEO"
        f = item.feature
        if self.qwen:
            return f.dim() == (3 if video else 2) and f.shape[-1] == self.inner.unit_dim and \
                "grid_hw" in item.model_specific_data
        return f.dim() == (4 if video else 3) and f.shape[-3] == 3

    def _unit(self, item: Any) -> EncodeItem:
        modality = item.modality.name.lower()
        f = item.feature
        if self.qwen:
            h, w = item.model_specific_data["grid_hw"]
            return EncodeItem(f, h * w, modality, item.hash, {"grid_hw": (h, w)})
        ps = self.inner.patch_size
        return EncodeItem(f, (f.shape[-2] // ps) * (f.shape[-1] // ps), modality, item.hash)

    def units(self, item: Any) -> list[EncodeItem]:
        unit = self._unit(item)
        with self._lock:
            self._expected[item.hash] = unit.pixel_values.shape[0] if unit.modality == "video" else 1
        return [unit]

    def output_tokens(self, item: Any) -> int:
        unit = self._unit(item)
        frames = unit.pixel_values.shape[0] if unit.modality == "video" else 1
        return frames * unit.num_patches // self.merge2

    def output_bytes(self, item: Any) -> int:
        return self.output_tokens(item) * self.llm_hidden * self.elem_bytes

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        outs = list(self.inner.forward(units))
        if self.projector is not None:
            sizes = [o.shape[0] for o in outs]
            outs = list(self.projector(torch.cat(outs)).split(sizes))
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        with self._lock:
            self.forwards.append((len(units), sum(u.num_patches for u in units)))
            for u in units:
                key = u.key[0] if isinstance(u.key, tuple) else u.key
                if key in self._expected:
                    self._done.setdefault(key, []).append(event)
        return outs

    def encode_direct(self, items: Sequence[Any]) -> torch.Tensor:
        """The model's own method: one tower forward for ``items`` on the caller's stream, rows in item order."""
        frames, spans = split_into_units([self._unit(item) for item in items])
        outs = assemble(self.forward(frames), spans)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def ready(self, item: Any) -> bool | None:
        """Has the early encode of ``item`` finished on the GPU? None when it was not submitted early."""
        with self._lock:
            expected = self._expected.get(item.hash)
            if expected is None:
                return None
            events = list(self._done.get(item.hash, ()))
        return len(events) >= expected and all(e is None or e.query() for e in events)

    def forget(self, items: Sequence[Any]) -> None:
        with self._lock:
            for item in items:
                self._expected.pop(item.hash, None)
                self._done.pop(item.hash, None)

    def take_forwards(self) -> list[tuple[int, int]]:
        with self._lock:
            out, self.forwards = self.forwards, []
        return out


# --- requests -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestSpec:
    """What a client sends: media, text prompt length and how many tokens it will generate."""

    media: tuple[Media, ...]
    text_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Workload:
    mix: MediaMix
    text_tokens: tuple[int, int]
    output_tokens: tuple[int, int]

    def request(self, rng: random.Random) -> RequestSpec:
        media = tuple(self.mix.draw(rng))
        return RequestSpec(media, rng.randint(*self.text_tokens), rng.randint(*self.output_tokens))

    @property
    def max_len(self) -> int:
        """KV length a request can reach: text + media + output, padded to 64."""
        longest = self.text_tokens[1] + self.mix.max_tokens + self.output_tokens[1]
        return -(-longest // 64) * 64


_HASHES = itertools.count(1)
_RIDS = itertools.count(1)  # unique across runs: the plugin's services live through every run


class Req:
    """One request inside the serving loop: its SGLang-shaped items and its timeline."""

    def __init__(self, rid: str, spec: RequestSpec, arrival: float) -> None:
        self.rid, self.spec, self.arrival = rid, spec, arrival
        prefix = min(16, spec.text_tokens)
        pos = prefix
        self.items: list[SimpleNamespace] = []
        for media in spec.media:
            self.items.append(SimpleNamespace(
                modality=Modality.VIDEO if media.modality == "video" else Modality.IMAGE, hash=next(_HASHES),
                pad_value=0, offsets=[(pos, pos + media.tokens - 1)], feature=media.pixels,
                precomputed_embeddings=None, model_specific_data=dict(media.meta)))
            pos += media.tokens
        self.prompt_len = pos + spec.text_tokens - prefix
        self.seen = arrival  # when the scheduler ingested it
        self.held = False  # the tuned mode's admission guard kept it waiting at least once
        self.slot = -1
        self.length = 0
        self.last_token = 0
        self.token_times: list[float] = []
        self.finished: float | None = None

    @property
    def done(self) -> bool:
        return len(self.token_times) >= self.spec.output_tokens


# --- the serving loop -----------------------------------------------------------------------------
@dataclass
class ModeSetup:
    """How one mode encodes, and on which stream its forwards run."""

    name: str
    stream: torch.cuda.Stream | None
    service: EncoderService | None = None
    guard_hold_s: float | None = None  # admission guard (plugin-tuned)


@dataclass
class RunLog:
    reqs: list[Req]
    t0: float
    end: float
    prefill_sizes: list[int]
    decode_sizes: list[int]
    decode_ms: list[float]
    prefill_ms: list[float] = dataclasses.field(default_factory=list)
    encode_ms: list[float] = dataclasses.field(default_factory=list)  # host time inside encoder calls, per prefill


class ServingLoop:
    """SGLang's ``event_loop_normal`` shape: ingest -> prefill new requests, else decode the running batch."""

    def __init__(self, llm: DecoderLM, tower: ServedTower, max_running: int, chunk_tokens: int,
                 graphs: DecodeGraphs | None = None) -> None:
        self.llm, self.tower, self.graphs = llm, tower, graphs
        self.max_running, self.chunk_tokens = max_running, chunk_tokens

    def serve(self, mode: ModeSetup, trace: Sequence[tuple[float, RequestSpec]], stop_after: float) -> RunLog:
        """Replay ``trace`` (open loop: arrivals never wait for completions) until done or ``stop_after`` s."""
        service = mode.service
        pending = list(trace)
        next_arrival = 0
        waiting: list[Req] = []
        running: list[Req] = []
        all_reqs: list[Req] = []
        log_ = RunLog(all_reqs, 0.0, 0.0, [], [], [])
        self.tower.take_forwards()
        with stream_ctx(mode.stream), torch.inference_mode():
            t0 = time.perf_counter() + 0.02
            log_.t0 = t0
            deadline = t0 + stop_after
            while True:
                now = time.perf_counter()
                while next_arrival < len(pending) and t0 + pending[next_arrival][0] <= now:  # ingest
                    at, spec = pending[next_arrival]
                    req = Req(f"r{next(_RIDS)}", spec, t0 + at)
                    req.seen = now
                    next_arrival += 1
                    waiting.append(req)
                    all_reqs.append(req)
                    if service is not None:
                        service.on_arrival(req.rid, req.items)
                if (next_arrival == len(pending) and not waiting and not running) or now > deadline:
                    break
                batch = self._admit(mode, waiting, running, now)
                if batch:
                    t = time.perf_counter()
                    log_.encode_ms.append(self._prefill(mode, batch, running))
                    log_.prefill_ms.append((time.perf_counter() - t) * 1e3)
                    log_.prefill_sizes.append(len(batch))
                elif running:
                    log_.decode_sizes.append(len(running))
                    t = time.perf_counter()
                    self._decode(mode, running)
                    log_.decode_ms.append((time.perf_counter() - t) * 1e3)
                elif next_arrival < len(pending):  # idle: nothing queued, nothing running
                    time.sleep(max(0.0, t0 + pending[next_arrival][0] - time.perf_counter()))
            log_.end = time.perf_counter()
            if mode.stream is not None:
                mode.stream.synchronize()
        for req in waiting + running:  # cut: free what the service still holds for unfinished requests
            if service is not None:
                service.release(req.rid, aborted=True)
            self.tower.forget(req.items)
        return log_

    def _admit(self, mode: ModeSetup, waiting: list[Req], running: list[Req], now: float) -> list[Req]:
        """FIFO under the prefill token budget and the running-request cap (SGLang's PrefillAdder, simplified)."""
        room = self.max_running - len(running)
        if room <= 0 or not waiting:
            return []
        batch: list[Req] = []
        keep: list[Req] = []
        tokens, full = 0, False
        for req in waiting:
            full = full or len(batch) >= room or (bool(batch) and tokens + req.prompt_len > self.chunk_tokens)
            if full:
                keep.append(req)
                continue
            if (mode.guard_hold_s is not None and running and now - req.seen < mode.guard_hold_s
                    and not all(self.tower.ready(item) is not False for item in req.items)):
                keep.append(req)  # its encode is still running: decode meanwhile instead of blocking on it
                req.held = True
                continue
            batch.append(req)
            tokens += req.prompt_len
        waiting[:] = keep
        return batch

    def _media_embeddings(self, mode: ModeSetup, batch: list[Req], starts: list[int]) -> tuple[list[torch.Tensor],
                                                                                                  list[int]]:
        """Encoder calls of one prefill, as SGLang's ``embed_mm_inputs`` makes them; rows and their positions."""
        calls: list[list[tuple[Req, int, Any]]] = []
        if mode.name == "inline":  # one call per request
            calls = [[(r, s, it) for it in r.items] for r, s in zip(batch, starts, strict=True) if r.items]
        else:  # all images of the batch in one call; videos request by request
            images = [(r, s, it) for r, s in zip(batch, starts, strict=True) for it in r.items
                      if it.modality is Modality.IMAGE]
            calls = [images] if images else []
            calls += [[(r, s, it)] for r, s in zip(batch, starts, strict=True) for it in r.items
                      if it.modality is Modality.VIDEO]
        rows, positions = [], []
        for call in calls:
            items = [it for _, _, it in call]
            if mode.service is None:
                out = self.tower.encode_direct(items)
            else:
                out = mode.service.encode(items, self.tower.encode_direct)
            rows.append(out)
            for _, start, it in call:
                a, b = it.offsets[0]
                positions.extend(range(start + a, start + b + 1))
            if out.shape[0] != sum(it.offsets[0][1] - it.offsets[0][0] + 1 for it in items):
                raise RuntimeError(f"encoder returned {out.shape[0]} rows for items of other token counts")
        return rows, positions

    def _prefill(self, mode: ModeSetup, batch: list[Req], running: list[Req]) -> float:
        """Prefill ``batch`` and add it to ``running``; returns the host milliseconds spent in encoder calls."""
        llm = self.llm
        lens = [r.prompt_len for r in batch]
        starts = list(itertools.accumulate(lens, initial=0))[:-1]
        ids = torch.randint(0, llm.shape.vocab, (sum(lens),), device=llm.device)
        x = llm.embed[ids]
        t = time.perf_counter()
        rows, positions = self._media_embeddings(mode, batch, starts)
        encode_ms = (time.perf_counter() - t) * 1e3
        if rows:
            x[llm.h2d(positions)] = torch.cat(rows).to(x.dtype)
        for i, req in enumerate(batch):
            req.slot = len(running) + i
        hidden = llm.prefill([r.slot for r in batch], x, lens)
        tokens = llm.sample(hidden).tolist()
        now = time.perf_counter()
        for req, tok in zip(batch, tokens, strict=True):
            req.length, req.last_token = req.prompt_len, tok
            req.token_times.append(now)
            if mode.service is not None:  # SGLang's run_batch AFTER hook: prefill has passed the items' tokens
                mode.service.consumed(req.rid, req.items, req.prompt_len)
        running.extend(batch)
        self._retire(mode, running, now)
        return encode_ms

    def _decode(self, mode: ModeSetup, running: list[Req]) -> None:
        step = self.graphs.decode if self.graphs is not None else self.llm.decode
        hidden = step([r.last_token for r in running], [r.length for r in running])
        tokens = self.llm.sample(hidden).tolist()
        now = time.perf_counter()
        for req, tok in zip(running, tokens, strict=True):
            req.length += 1
            req.last_token = tok
            req.token_times.append(now)
        self._retire(mode, running, now)

    def _retire(self, mode: ModeSetup, running: list[Req], now: float) -> None:
        """Finish done requests (release their items) and compact slots: the last ones move into the holes."""
        finished = [r for r in running if r.done]
        if not finished:
            return
        alive = [r for r in running if not r.done]
        holes = sorted(r.slot for r in finished if r.slot < len(alive))
        movers = [r for r in alive if r.slot >= len(alive)]
        for hole, req in zip(holes, movers, strict=True):
            self.llm.move_slot(req.slot, hole, req.length)
            req.slot = hole
        for req in finished:
            req.finished = now
            if mode.service is not None:
                mode.service.release(req.rid, aborted=False)
            self.tower.forget(req.items)
        running[:] = sorted(alive, key=lambda r: r.slot)


# --- measurement ----------------------------------------------------------------------------------
def summarize(run: RunLog, duration: float, forwards: list[tuple[int, int]]) -> dict[str, Any]:
    """TTFT from scheduled arrival to the first token on the host; ITL between a request's tokens.

    ``tok_s`` counts tokens produced while arrivals run (the service rate under that load); requests
    that never got a first token count with their age at the cut (a lower bound).
    """
    reqs, t0 = run.reqs, run.t0
    ttft = [((r.token_times[0] if r.token_times else run.end) - r.arrival) * 1e3 for r in reqs]
    itl = [(b - a) * 1e3 for r in reqs for a, b in itertools.pairwise(r.token_times)]
    e2e = [(r.finished - r.arrival) * 1e3 for r in reqs if r.finished is not None]
    in_window = sum(1 for r in reqs for t in r.token_times if t <= t0 + duration)
    total = sum(len(r.token_times) for r in reqs)
    last = max((t for r in reqs for t in r.token_times[-1:]), default=t0)
    units = [u for u, _ in forwards]
    out: dict[str, Any] = {
        "requests": len(reqs), "completed": sum(r.finished is not None for r in reqs),
        **latency_stats(ttft, "ttft"), **latency_stats(itl, "itl"),
        "tok_s": in_window / duration, "tok_s_total": total / (last - t0) if last > t0 else 0.0,
        "output_tokens": total, "e2e_p50_ms": pct(e2e, 50),
        "encoder_calls": len(forwards),
        "encoder_units_per_call_mean": statistics.fmean(units) if units else 0.0,
        "encoder_units_per_call_p50": pct(units, 50) if units else 0.0,
        "encoder_units_per_call_max": max(units, default=0),
        "encoder_patches_per_call_mean": statistics.fmean(p for _, p in forwards) if forwards else 0.0,
        "prefill_batches": len(run.prefill_sizes),
        "prefill_reqs_per_batch_mean": statistics.fmean(run.prefill_sizes) if run.prefill_sizes else 0.0,
        "decode_steps": len(run.decode_sizes),
        "decode_batch_mean": statistics.fmean(run.decode_sizes) if run.decode_sizes else 0.0,
        "decode_step_p50_ms": pct(run.decode_ms, 50), "decode_step_p99_ms": pct(run.decode_ms, 99),
        "prefill_p50_ms": pct(run.prefill_ms, 50), "prefill_p99_ms": pct(run.prefill_ms, 99),
        "prefill_encode_p50_ms": pct(run.encode_ms, 50), "prefill_encode_p99_ms": pct(run.encode_ms, 99),
        "prefill_encode_share": sum(run.encode_ms) / sum(run.prefill_ms) if run.prefill_ms else 0.0,
        "guard_held_requests": sum(r.held for r in reqs), "wall_s": run.end - t0,
    }
    return out


def service_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    keys = ("submitted", "taken_early", "encoded_on_demand", "fallbacks", "deferred", "cancelled", "wait_timeouts",
            "forwards")
    return {f"service_{k}": int(after.get(k, 0)) - int(before.get(k, 0)) for k in keys if k in after}


def capacity_of(run: RunLog) -> float:
    """Completed requests per second of a saturated run: over its last two thirds, or all of it if it drained."""
    finishes = sorted(r.finished for r in run.reqs if r.finished is not None)
    if not finishes:
        return 0.0
    if len(finishes) == len(run.reqs):
        return len(finishes) / (finishes[-1] - run.t0)
    lo = run.t0 + (run.end - run.t0) / 3
    return sum(f >= lo for f in finishes) / (run.end - lo)


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 9's ratios against ``inline`` at 50/80 % load, and each mode's capacity: the first load at
    which TTFT p50 passes 2x its value at the lightest load (None: it never did, so beyond the sweep)."""
    by = {(r["mode"], r["load"]): r for r in rows}
    loads = sorted({r["load"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    out: dict[str, Any] = {"ttft_2x_at_load": {}}
    for mode in modes:
        measured = [load for load in loads if (mode, load) in by]
        base = by[(mode, measured[0])]["ttft_p50_ms"]
        over = [load for load in measured if by[(mode, load)]["ttft_p50_ms"] > 2 * base]
        out["ttft_2x_at_load"][mode] = min(over) if over else None
    inline_cap = out["ttft_2x_at_load"].get("inline")
    for mode in modes:
        if mode == "inline":
            continue
        cap = out["ttft_2x_at_load"][mode]
        out[f"{mode}_capacity_above_inline"] = (cap is None and inline_cap is not None) or (
            cap is not None and inline_cap is not None and cap > inline_cap)
        for load in (0.5, 0.8):
            if (mode, load) not in by or ("inline", load) not in by:
                continue
            m, i = by[(mode, load)], by[("inline", load)]
            ratios = {"ttft_p50": m["ttft_p50_ms"] / i["ttft_p50_ms"], "itl_p99": m["itl_p99_ms"] / i["itl_p99_ms"],
                      "tok_s": m["tok_s"] / i["tok_s"] if i["tok_s"] else float("nan")}
            ratios["ok"] = ratios["ttft_p50"] <= 0.70 and ratios["itl_p99"] <= 1.05 and ratios["tok_s"] >= 1.0
            out[f"{mode}@{load:g}"] = ratios
    return out


TABLE = (("mode", "mode", ""), ("load", "load", ".0%"), ("offered_req_s", "req/s", ".1f"),
         ("completed", "done", "d"), ("requests", "of", "d"), ("ttft_p50_ms", "TTFT p50", ".0f"),
         ("ttft_p90_ms", "p90", ".0f"), ("ttft_p99_ms", "p99", ".0f"), ("itl_p50_ms", "ITL p50", ".1f"),
         ("itl_p99_ms", "p99", ".1f"), ("tok_s", "tok/s", ".0f"), ("encoder_calls", "enc calls", "d"),
         ("encoder_units_per_call_mean", "units/call", ".2f"), ("decode_batch_mean", "decode B", ".1f"),
         ("guard_held_requests", "held", "d"))
README_TABLE = (("load", "load", ".0%"), ("mode", "mode", ""), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
                ("ttft_p90_ms", "p90", ".0f"), ("ttft_p99_ms", "p99", ".0f"), ("itl_p50_ms", "ITL p50 ms", ".1f"),
                ("itl_p99_ms", "p99", ".1f"), ("tok_s", "tok/s", ".0f"),
                ("ttft_p50_vs_inline", "TTFT p50 / inline", ".2f"),
                ("itl_p99_vs_inline", "ITL p99 / inline", ".2f"), ("tok_s_vs_inline", "tok/s / inline", ".2f"),
                ("encoder_units_per_call_mean", "units / encoder call", ".1f"))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's TTFT p50, ITL p99 and tokens/s over inline's at the same load (the issue's target ratios)."""
    inline = {r["load"]: r for r in rows if r["mode"] == "inline"}
    for row in rows:
        base = inline.get(row["load"])
        for key, name in (("ttft_p50_ms", "ttft_p50_vs_inline"), ("itl_p99_ms", "itl_p99_vs_inline"),
                          ("tok_s", "tok_s_vs_inline")):
            if base is not None and base[key]:
                row[name] = row[key] / base[key]


# --- main -----------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny towers and a 2-layer tiny LM, seconds")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tower", default="qwen2_5_vl", choices=["qwen2_5_vl", "siglip-mixed"])
    p.add_argument("--media", default="standard", choices=["standard", "heavy"],
                   help="standard: 224-504 px images, 224 px clips; heavy: 560-1120 px images, 448 px clips "
                        "(Qwen2.5-VL tower only)")
    p.add_argument("--layers", type=int, default=None, help="LM layers (default: the shape's 28)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--loads", default=",".join(f"{x:g}" for x in LOADS), help="fractions of inline's capacity")
    p.add_argument("--seconds", type=float, default=None, help="arrival window per run (default 8; smoke 0.25)")
    p.add_argument("--min-requests", type=int, default=None, help="lengthen a light run's window to get these")
    p.add_argument("--drain-seconds", type=float, default=None, help="most time after the window (default 12)")
    p.add_argument("--capacity-seconds", type=float, default=None, help="saturated inline run (default 12)")
    p.add_argument("--burst", type=int, default=None, help="requests of the saturated run (default 400)")
    p.add_argument("--max-running", type=int, default=None, help="running-request cap (default 64; smoke 8)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="prompt tokens per prefill (default 8192)")
    p.add_argument("--tuned-hold-ms", type=float, default=150.0,
                   help="plugin-tuned: longest a request waits for its early encode while decode runs")
    p.add_argument("--tuned-max-inflight", type=int, default=None,
                   help="plugin-tuned: coalescer max_inflight_batches (default: the config's)")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager decode steps (SGLang graphs them)")
    p.add_argument("--cudnn-sdpa", action="store_true", help="keep cuDNN SDPA (builds a graph per new shape)")
    p.add_argument("--time-budget-s", type=float, default=480.0,
                   help="skip runs that would end later than this after start (the device allows 600 s a command)")
    p.add_argument("--trace", default=None, metavar="MODE@LOAD",
                   help="after the sweep, profile that run's first --trace-seconds (torch.profiler, chrome trace)")
    p.add_argument("--trace-seconds", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    smoke = args.smoke
    args.device = args.device or ("cpu" if smoke else "cuda")
    defaults = {"seconds": (0.25, 8.0), "min_requests": (3, 30), "drain_seconds": (60.0, 12.0),
                "capacity_seconds": (30.0, 12.0), "burst": (12, 400), "max_running": (8, 64),
                "chunk_tokens": (512, 8192)}
    for key, (tiny, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if smoke else full)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = set(args.modes) - set(MODES) - set(EXTRA_MODES)
    if unknown or "inline" not in args.modes:
        p.error(f"--modes must include inline and name only {MODES + EXTRA_MODES}; got {args.modes}")
    args.loads = [float(x) for x in args.loads.split(",") if x]
    return args


def plugin_settings(args: argparse.Namespace, bpp: int) -> tuple[CoalescerConfig, dict[str, Any]]:
    """The shipped config as the plugin reads it: coalescer settings and its ``sglang:`` section (LLM stream
    priority, prefill wait), through ``mm_scheduler_sglang.settings``; bytes/patch measured once here."""
    if args.tower != "qwen2_5_vl":
        config = config_from_dict({"max_batch_items": 64, "budget_bytes": 1 << 30, "bytes_per_patch": bpp,
                                   "name": "serving-plugin"})
        return config, dict(PLUGIN_DEFAULTS)
    path = REPO / "configs" / "qwen2_5_vl.yaml"
    chosen = resolve_plugin(True, str(path))
    return load_config(path, bytes_per_patch=bpp, name="serving-plugin"), chosen["plugin"]  # type: ignore[index]


def capture_decode_graphs(llm: DecoderLM, enabled: bool) -> tuple[DecodeGraphs | None, dict[str, Any]]:
    """Capture decode graphs and check one replay against the eager step; eager decode if either fails."""
    if not enabled:
        return None, {"enabled": False, "reason": "CPU or --no-cuda-graph"}
    t = time.perf_counter()
    try:
        graphs = DecodeGraphs(llm)
        diff = graphs.check()
    except Exception as exc:  # a capture failure must not cost the (single) GPU run: fall back to eager
        log(f"decode CUDA graphs unavailable ({exc!r}); decoding eagerly")
        return None, {"enabled": False, "reason": repr(exc)}
    note = {"enabled": diff < 0.02, "graphs": len(graphs.graphs), "batches": graphs.batches, "spans": graphs.spans,
            "replay_vs_eager_rel_diff": diff, "capture_s": time.perf_counter() - t}
    log(f"decode CUDA graphs: {note}")
    if diff >= 0.02:
        log("decode CUDA graph replay differs from the eager step; decoding eagerly")
        return None, note
    return graphs, note


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    device = resolve(args.device)
    cuda = device.type == "cuda"
    if cuda and not args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY_LM if args.smoke else QWEN2_5_VL_7B_LM
    if args.layers:
        shape = dataclasses.replace(shape, layers=args.layers)

    raw_tower = build_bench_tower(args.tower, device, tiny=args.smoke)
    tower = ServedTower(raw_tower, shape.hidden)
    mix = MediaMix(args.tower, raw_tower, tiny=args.smoke, seed=args.seed, heavy=args.media == "heavy")
    work = Workload(mix, (4, 24) if args.smoke else (64, 512), (2, 6) if args.smoke else (32, 192))
    t = time.perf_counter()
    llm = DecoderLM(shape, device, dtype, args.max_running, work.max_len, seed=args.seed)
    log(f"LM {shape.describe()}: {llm.weight_bytes / 2**30:.2f} GiB weights, KV cache "
        f"{llm.kv.numel() * llm.kv.element_size() / 2**30:.2f} GiB ({args.max_running} x {work.max_len} tokens); "
        f"built in {time.perf_counter() - t:.1f}s")
    graphs, graph_note = capture_decode_graphs(llm, enabled=cuda and not args.no_cuda_graph)
    bpp = bytes_per_patch(raw_tower)
    tower.bytes_per_patch = bpp
    base_config, plugin = plugin_settings(args, bpp)
    tuned_config = base_config.replace(name="serving-plugin-tuned", **(
        {"max_inflight_batches": args.tuned_max_inflight} if args.tuned_max_inflight else {}))
    equal_config = base_config.replace(name="serving-plugin-equal-priority")

    # SGLang makes its streams at priority 0, CUDA's lowest (= the encoder stream's); the plugin's
    # llm_stream_priority "high" makes them at the device's highest priority instead.
    normal = torch.cuda.Stream(device, priority=0) if cuda else None
    high = torch.cuda.Stream(device, priority=torch.cuda.Stream.priority_range()[1]) if cuda else None
    plugin_stream = high if plugin["llm_stream_priority"] == "high" else normal
    wait_s = plugin["prefill_wait_ms"] / 1000.0
    setups: dict[str, ModeSetup] = {}
    for mode in args.modes:
        if mode == "plugin":
            service = EncoderService(tower, base_config, lockstep=False, prefill_wait_s=wait_s).start()
            setups[mode] = ModeSetup(mode, plugin_stream, service)
        elif mode == "plugin-tuned":
            service = EncoderService(tower, tuned_config, lockstep=False, prefill_wait_s=wait_s).start()
            setups[mode] = ModeSetup(mode, plugin_stream, service, guard_hold_s=args.tuned_hold_ms / 1e3)
        elif mode == "plugin-equal-priority":
            service = EncoderService(tower, equal_config, lockstep=False, prefill_wait_s=wait_s).start()
            setups[mode] = ModeSetup(mode, normal, service)
        else:
            setups[mode] = ModeSetup(mode, normal)
    loop = ServingLoop(llm, tower, args.max_running, args.chunk_tokens, graphs)
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args),
        "torch": torch.__version__, "tower": args.tower, "llm": dataclasses.asdict(shape),
        "llm_weight_gib": llm.weight_bytes / 2**30, "decode_cuda_graphs": graph_note, "max_len": work.max_len,
        "bytes_per_patch": bpp,
        "coalescer_config": dataclasses.asdict(base_config), "tuned_config": dataclasses.asdict(tuned_config),
        "plugin_settings": plugin,
        "stream_priority": {"normal": normal.priority if normal else None, "high": high.priority if high else None},
        "workload": {"text_tokens": work.text_tokens, "output_tokens": work.output_tokens,
                     "media": f"{args.media}: 50 % one image, 30 % 2-3 images, 20 % one video",
                     "image_tokens": sorted({g[0].tokens for g in mix.images}),
                     "video_tokens": mix.videos[0].tokens},
    }
    llm_shape = shape.describe() + ("" if shape.layers == QWEN2_5_VL_7B_LM.layers or args.smoke
                                    else f" (scaled: {shape.layers} of 28 layers)")
    out = Path(args.out)
    stem = "serving_bench_smoke" if args.smoke else "serving_bench" + ("_heavy" if args.media == "heavy" else "")

    def save(rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Written after every run, so a run cut short by the device's time limit still leaves its rows."""
        report = {"device": device_name(device), "llm_shape": llm_shape, "rows": rows}
        meta["targets"] = targets(rows)
        meta["total_seconds"] = time.perf_counter() - started
        if cuda:
            meta["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        write_json(out / f"{stem}.json", report)
        write_json(out / f"{stem}_meta.json", meta)
        return report

    try:
        rows = run_all(args, loop, setups, work, meta, save, deadline=started + args.time_budget_s)
        if args.trace:
            meta["trace"] = profile_run(args, loop, setups, work, meta, out)
    finally:
        for setup in setups.values():
            if setup.service is not None:
                setup.service.close()
    add_ratios(rows)
    report = save(rows)
    print(f"\n{report['device']}; {llm_shape}; tower {args.tower}; inline capacity "
          f"{meta['inline_capacity_req_s']:.2f} req/s; decode CUDA graphs {graph_note['enabled']}")
    print(format_table(rows, TABLE))
    print("\ntargets (ratios vs inline; TTFT-2x load):")
    for key, value in meta["targets"].items():
        print(f"  {key}: {value}")
    for problem in meta.get("errors", []) + meta.get("skipped", []):
        print(f"  NOT MEASURED: {problem}")
    print(f"total {meta['total_seconds']:.0f} s wall")
    ordered = sorted(rows, key=lambda r: (r["load"], (MODES + EXTRA_MODES).index(r["mode"])))
    (out / f"{stem}_table.md").write_text(markdown_table(ordered, README_TABLE) + "\n")
    try:
        from benchmarks.plot_serving import plot

        plot(report, meta, out / f"{stem}.png")
        log(f"wrote {out / f'{stem}.png'}")
    except ImportError as exc:
        log(f"no plot ({exc}); run python -m benchmarks.plot_serving {out / f'{stem}.json'} where matplotlib is")
    log(f"wrote {out / f'{stem}.json'}; total {meta['total_seconds']:.0f} s wall")
    return 0 if not meta.get("errors") else 1


def run_all(args: argparse.Namespace, loop: ServingLoop, setups: dict[str, ModeSetup], work: Workload,
            meta: dict[str, Any], save: Callable[[list[dict[str, Any]]], Any],
            deadline: float) -> list[dict[str, Any]]:
    """Warm every mode, measure inline's capacity, then every load x mode on the same traces.

    A run that raises is logged and left out (the others still run); runs that would end past
    ``deadline`` are skipped, so the whole command stays inside the device's per-command limit.
    """
    warm = [(0.0, RequestSpec(tuple(media), 8, 3)) for media in work.mix.warm_set()]
    warm += poisson_trace(work.request, 200.0, 0.05, seed=99)
    t = time.perf_counter()
    for setup in setups.values():
        loop.serve(setup, warm, stop_after=120.0)
    log(f"warm-up of {len(setups)} modes: {time.perf_counter() - t:.1f}s")

    rng = random.Random(args.seed + 7)
    burst = [(0.0, work.request(rng)) for _ in range(args.burst)]
    cap_run = loop.serve(setups["inline"], burst, stop_after=args.capacity_seconds)
    capacity = capacity_of(cap_run)
    if capacity <= 0:
        raise RuntimeError(f"inline completed no request of a {len(burst)}-request burst in "
                           f"{args.capacity_seconds} s: raise --capacity-seconds")
    meta["inline_capacity_req_s"] = capacity
    meta["capacity_run"] = {"requests": len(burst), "completed": sum(r.finished is not None for r in cap_run.reqs),
                            "seconds": cap_run.end - cap_run.t0}
    log(f"inline capacity: {capacity:.2f} req/s ({meta['capacity_run']})")

    rows: list[dict[str, Any]] = []
    plan = [(load, mode) for load in args.loads for mode in args.modes]
    traces: dict[float, tuple[float, list[tuple[float, RequestSpec]]]] = {}
    for i, load in enumerate(args.loads):
        rate = load * capacity
        duration = min(2 * args.seconds, max(args.seconds, args.min_requests / rate))
        traces[load] = (duration, poisson_trace(work.request, rate, duration, seed=1000 + i))
    bar = progress(plan, len(plan), "serving runs")
    for load, mode in bar:
        duration, trace = traces[load]
        if time.perf_counter() + duration + 3.0 > deadline:
            meta.setdefault("skipped", []).append(f"{mode} at {load:.0%}: --time-budget-s reached")
            log(f"skipping {mode} at {load:.0%}: time budget reached")
            continue
        setup = setups[mode]
        before = setup.service.stats() if setup.service else {}
        try:
            run = loop.serve(setup, trace, stop_after=duration + args.drain_seconds)
        except Exception as exc:  # keep the other modes' measurements of this (single) device run
            log(f"{mode} at {load:.0%} failed:\n{traceback.format_exc()}")
            meta.setdefault("errors", []).append(f"{mode} at {load:.0%}: {exc!r}")
            continue
        row = {"mode": mode, "load": load, "offered_req_s": load * capacity, "duration_s": duration,
               "trace_requests": len(trace),
               **summarize(run, duration, loop.tower.take_forwards())}
        if setup.service:
            row.update(service_delta(before, setup.service.stats()))
        rows.append(row)
        save(rows)
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{mode} {load:.0%}: TTFT p50 {row['ttft_p50_ms']:.0f} ms, "
                                f"ITL p99 {row['itl_p99_ms']:.1f} ms")
        else:
            log(f"{mode} {load:.0%}: TTFT p50 {row['ttft_p50_ms']:.0f} ms, ITL p99 {row['itl_p99_ms']:.1f} ms")
    return rows


def profile_run(args: argparse.Namespace, loop: ServingLoop, setups: dict[str, ModeSetup], work: Workload,
                meta: dict[str, Any], out: Path) -> str:
    """Stream timeline of one mode and load (the load's trace, first ``--trace-seconds``) as a chrome trace."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    mode, _, load_text = args.trace.partition("@")
    load = float(load_text)
    rate = load * meta["inline_capacity_req_s"]
    seed = 1000 + args.loads.index(load) if load in args.loads else 2000  # the sweep's trace for that load
    trace = poisson_trace(work.request, rate, args.trace_seconds, seed=seed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        loop.serve(setups[mode], trace, stop_after=args.trace_seconds + args.drain_seconds)
    raw = out / f"serving_trace_{mode}_{load:g}.json"
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    log(f"wrote {raw}.gz")
    return f"{raw.name}.gz"


if __name__ == "__main__":
    sys.exit(main())
