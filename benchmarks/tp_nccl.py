"""Tensor parallelism on two GPUs: a TP-sharded ViT driven through LockstepEncoder beside LLM-like steps.

Two processes, one per GPU, NCCL (gloo and tiny shapes on CPU with ``--smoke``). The vision tower is
a stack of Qwen2.5-VL-sized blocks (hidden 1280, 16 heads, MLP 3420, 32 blocks; random weights)
sharded as SGLang shards Qwen2.5-VL's ViT: qkv and gate/up column-parallel (heads and MLP rows split
over the ranks), proj and down row-parallel followed by an all-reduce. The LLM-like step (Qwen2.5-VL-7B
text sizes: hidden 3584, MLP 18944, 28 layers, 64 tokens) all-reduces twice per layer on the same
communicator, and everything runs on one forward stream on the scheduler thread, where SGLang runs
its encoder inside the prefill forward. The encoder has no weight of its own in the LLM; rotary
embeddings, windowed attention and the patch merger are left out (no collectives there).

Phases (each rank runs all of them; rank 0 writes the JSON):
1. ``tp_equals_single_gpu``: TP=2 lockstep outputs against the unsharded tower's on one GPU (bf16).
2. ``throughput``: encoder alone, LLM step alone, and a mixed loop (prefill encodes + LLM steps),
   at TP=2 and TP=1 (each rank then runs the full model on its own GPU, no collective).
3. ``soak``: thousands of requests with per-rank jittered timing (different sleeps on each rank);
   every rank must run identical encoder forwards and produce bitwise-identical outputs.
4. ``failure``: OOM (a real allocation that fails) and an exception after the tower's collectives,
   injected on rank 1 only; with the lockstep agreement step both ranks take the same path per item
   (early / on_demand / fallback = the tower called directly, as SGLang's own method would).
A watchdog thread exits the process (code 3) if the run outlives ``--watchdog-s``; collectives time
out after ``--collective-timeout-s``. A hang therefore fails the run instead of holding the machine.

GPU (2 GPUs):  python -m benchmarks.tp_nccl --out benchmarks/results
CPU smoke:     python -m benchmarks.tp_nccl --smoke --out /tmp/tp_smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
import traceback
import zlib
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mm_scheduler import CoalescerConfig, EncodeError, EncodeItem  # noqa: E402
from mm_scheduler.lockstep import LockstepEncoder, process_group_agree  # noqa: E402


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    inter: int
    depth: int
    patch_dim: int
    llm_hidden: int
    llm_inter: int
    llm_layers: int
    llm_tokens: int
    sizes: tuple[int, ...]  # patches per image (224^2 -> 256, 336^2 -> 576, 448^2 -> 1024 at patch 14)
    soak_requests: int
    bench_requests: int
    budget_patches: int
    max_items: int
    jitter_s: float  # per-rank sleeps are uniform(0, jitter_s), sometimes 10x


GPU = Shape(hidden=1280, heads=16, inter=3420, depth=32, patch_dim=1176, llm_hidden=3584, llm_inter=18944,
            llm_layers=28, llm_tokens=64, sizes=(64, 256, 576, 1024), soak_requests=2000, bench_requests=500,
            budget_patches=8192, max_items=16, jitter_s=0.002)
SMOKE = Shape(hidden=64, heads=4, inter=96, depth=2, patch_dim=24, llm_hidden=64, llm_inter=128, llm_layers=2,
              llm_tokens=8, sizes=(4, 8, 16), soak_requests=60, bench_requests=12, budget_patches=48, max_items=4,
              jitter_s=0.002)


class Log:
    def __init__(self, path: Path, rank: int) -> None:
        self.path, self.rank, self.t0 = path, rank, time.monotonic()

    def __call__(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.2f}s rank{self.rank}] {msg}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def _randn(shape: tuple[int, ...], seed: int, device: torch.device, std: float) -> torch.Tensor:
    """Identical on every rank (same seed, same device type): ranks slice their shard from it."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight


class TPViT:
    """A Qwen2.5-VL-like ViT block stack, sharded over ``world`` ranks (world=1: the unsharded tower)."""

    def __init__(self, s: Shape, device: torch.device, dtype: torch.dtype, rank: int, world: int,
                 group: Any = None) -> None:
        assert s.heads % world == 0 and s.inter % world == 0
        self.world, self.group = world, group
        hd, hl, il = s.hidden // s.heads, s.heads // world, s.inter // world
        self.hl, self.hd = hl, hd
        heads = slice(rank * hl, (rank + 1) * hl)
        rows = slice(rank * il, (rank + 1) * il)

        def w(shape, seed, std=0.02):
            return _randn(shape, seed, device, std)

        def cast(t):
            return t.to(dtype).contiguous()

        self.patch_w = cast(w((s.hidden, s.patch_dim), 1, std=1 / math.sqrt(s.patch_dim)))
        self.final_norm = cast(1 + w((s.hidden,), 2, std=0.1))
        self.blocks = []
        for b in range(s.depth):
            seed = 1000 + 100 * b
            qkv = w((3, s.heads, hd, s.hidden), seed)[:, heads].reshape(3 * hl * hd, s.hidden)
            qkv_b = w((3, s.heads, hd), seed + 1)[:, heads].reshape(-1)
            proj = w((s.hidden, s.heads, hd), seed + 2)[:, heads].reshape(s.hidden, hl * hd)
            gate, up = w((s.inter, s.hidden), seed + 4)[rows], w((s.inter, s.hidden), seed + 5)[rows]
            gate_b, up_b = w((s.inter,), seed + 6)[rows], w((s.inter,), seed + 7)[rows]
            down = w((s.hidden, s.inter), seed + 8)[:, rows]
            self.blocks.append({
                "n1": cast(1 + w((s.hidden,), seed + 10, 0.1)), "n2": cast(1 + w((s.hidden,), seed + 11, 0.1)),
                "qkv": cast(qkv), "qkv_b": cast(qkv_b), "proj": cast(proj), "proj_b": cast(w((s.hidden,), seed + 3)),
                "gu": cast(torch.cat([gate, up])), "gu_b": cast(torch.cat([gate_b, up_b])),
                "down": cast(down), "down_b": cast(w((s.hidden,), seed + 9)),
            })
        self.collectives = 0

    def _reduce(self, t: torch.Tensor) -> None:
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
            self.collectives += 1

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = F.linear(pixels.to(self.patch_w.dtype), self.patch_w)
        n = x.shape[0]
        for blk in self.blocks:
            h = _rms(x, blk["n1"])
            q, k, v = F.linear(h, blk["qkv"], blk["qkv_b"]).view(n, 3, self.hl, self.hd).unbind(1)
            outs, start = [], 0
            for length in seqlens:  # varlen attention: each image attends to itself only
                sl = slice(start, start + length)
                o = F.scaled_dot_product_attention(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                                                   v[sl].transpose(0, 1)[None])
                outs.append(o[0].transpose(0, 1).reshape(length, self.hl * self.hd))
                start += length
            a = F.linear(torch.cat(outs), blk["proj"])
            self._reduce(a)
            x = x + a + blk["proj_b"]
            g, u = F.linear(_rms(x, blk["n2"]), blk["gu"], blk["gu_b"]).chunk(2, dim=-1)
            m = F.linear(F.silu(g) * u, blk["down"])
            self._reduce(m)
            x = x + m + blk["down_b"]
        return _rms(x, self.final_norm)


class LLMStep:
    """LLM-like layers, column/row-parallel with two all-reduces per layer, as SGLang's TP model runs."""

    def __init__(self, s: Shape, device: torch.device, dtype: torch.dtype, rank: int, world: int,
                 group: Any = None) -> None:
        self.world, self.group = world, group
        h, hl, il = s.llm_hidden, s.llm_hidden // world, s.llm_inter // world
        self.layers = []
        for i in range(s.llm_layers):
            seed = 90000 + 10 * i
            self.layers.append([t.to(dtype).contiguous() for t in (
                _randn((h, h), seed, device, 0.02)[rank * hl:(rank + 1) * hl],
                _randn((h, h), seed + 1, device, 0.02)[:, rank * hl:(rank + 1) * hl],
                torch.cat([_randn((s.llm_inter, h), seed + 2, device, 0.02)[rank * il:(rank + 1) * il],
                           _randn((s.llm_inter, h), seed + 3, device, 0.02)[rank * il:(rank + 1) * il]]),
                _randn((h, s.llm_inter), seed + 4, device, 0.02)[:, rank * il:(rank + 1) * il])])
        self.norm = torch.ones(h, device=device, dtype=dtype)
        self.x = _randn((s.llm_tokens, h), 7, device, 1.0).to(dtype)

    @torch.inference_mode()
    def step(self) -> None:
        x = self.x
        for qkv, o, gu, down in self.layers:
            a = F.linear(F.linear(_rms(x, self.norm), qkv), o)
            if self.world > 1:
                dist.all_reduce(a, group=self.group)
            x = x + a
            g, u = F.linear(_rms(x, self.norm), gu).chunk(2, dim=-1)
            m = F.linear(F.silu(g) * u, down)
            if self.world > 1:
                dist.all_reduce(m, group=self.group)
            x = _rms(x + m, self.norm)
        self.x = x


class TowerAdapter:
    """The ViT as LockstepEncoder sees it, with faults injected on ``fault_rank`` only."""

    ragged = True

    def __init__(self, vit: TPViT, device: torch.device, bytes_per_patch: int, rank: int, fault_rank: int = 1,
                 oom_keys: set | None = None, raise_keys: set | None = None, transient_oom_keys: set | None = None):
        self.vit, self.device, self.bytes_per_patch, self.rank = vit, device, bytes_per_patch, rank
        self.faulty = rank == fault_rank
        self.oom_keys, self.raise_keys = oom_keys or set(), raise_keys or set()
        self.transient_oom_keys = set(transient_oom_keys or ())
        self.log: list[tuple] = []

    def preflight(self, units) -> None:
        """Reserve the batch's budgeted bytes before the first collective; a failure here is agreed."""
        keys = {u.key for u in units}
        if self.faulty and (keys & self.oom_keys or keys & self.transient_oom_keys):
            self.transient_oom_keys -= keys
            torch.empty(1 << 50, dtype=torch.uint8, device=self.device)  # a real out-of-memory
        torch.empty(sum(u.num_patches for u in units) * self.bytes_per_patch, dtype=torch.uint8, device=self.device)

    def forward(self, units) -> list[torch.Tensor]:
        sizes = [u.num_patches for u in units]
        out = self.vit.forward(torch.cat([u.pixel_values for u in units]), sizes)
        self.log.append(tuple(u.key for u in units))
        if self.faulty and any(u.key in self.raise_keys for u in units):
            raise RuntimeError("injected failure after the tower's last collective")
        return list(out.split(sizes))


def _stable_hash(obj: Any) -> int:
    """Equal on every rank (``hash`` of strings is salted per process)."""
    return zlib.crc32(repr(obj).encode())


def _pixels(key: Any, n: int, s: Shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    seed = key if isinstance(key, int) else _stable_hash(key) % (1 << 30)
    return _randn((n, s.patch_dim), 10_000_000 + seed, device, 1.0).to(dtype)


def _request_sizes(s: Shape, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(s.sizes) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Jitter:
    """Per-rank sleeps at random points of the host loop: ranks run out of phase."""

    def __init__(self, rank: int, max_s: float, enabled: bool) -> None:
        self.rng, self.max_s, self.enabled = random.Random(100 + rank), max_s, enabled
        self.slept = 0.0

    def __call__(self) -> None:
        if self.enabled and self.rng.random() < 0.3:
            d = self.rng.uniform(0, self.max_s) * (10 if self.rng.random() < 0.05 else 1)
            self.slept += d
            time.sleep(d)


def mixed_loop(encoder: LockstepEncoder, llm: LLMStep, s: Shape, n: int, device: torch.device, dtype: torch.dtype,
               jitter: Jitter, seed: int) -> dict[str, Any]:
    """Scheduler-like loop: arrivals (the same on every rank) submit; prefills take results, then an LLM step."""
    sizes = _request_sizes(s, n, seed)
    arrive = random.Random(seed + 1)
    tickets: dict[int, Any] = {}
    sums: dict[int, torch.Tensor] = {}
    waiting: list[int] = []
    events: list[tuple[Any, Any]] = []
    nxt, iterations = 0, 0
    timed = device.type == "cuda"
    _sync(device)
    t0 = time.perf_counter()
    while nxt < n or waiting:
        jitter()
        for _ in range(arrive.choice((0, 1, 2, 3)) if nxt < n else 0):
            if nxt < n:
                tickets[nxt] = encoder.submit([EncodeItem(_pixels(nxt + seed * 100000, sizes[nxt], s, device, dtype),
                                                          sizes[nxt], "image", ("r", seed, nxt))])
                waiting.append(nxt)
                nxt += 1
        jitter()
        prefill, waiting = waiting[:3], waiting[3:]
        for i in prefill:  # the prefill forward needs these requests' embeddings
            sums[i] = encoder.result(tickets.pop(i))[0].float().sum()
        jitter()
        start = torch.cuda.Event(enable_timing=True) if timed else None
        end = torch.cuda.Event(enable_timing=True) if timed else None
        if timed:
            start.record()
        llm.step()
        if timed:
            end.record()
            events.append((start, end))
        iterations += 1
    _sync(device)
    wall = time.perf_counter() - t0
    step_ms = [a.elapsed_time(b) for a, b in events] if timed else []
    return {"requests": n, "iterations": iterations, "wall_s": wall, "iteration_ms": 1000 * wall / iterations,
            "llm_step_ms_in_loop": sum(step_ms) / len(step_ms) if step_ms else None,
            "patches": sum(sizes), "jitter_slept_s": jitter.slept,
            "checksums": torch.stack([sums[i] for i in range(n)]).cpu().tolist()}


def encoder_alone(encoder: LockstepEncoder, s: Shape, n: int, device: torch.device, dtype: torch.dtype) -> dict:
    sizes = _request_sizes(s, n, 5)
    items = [EncodeItem(_pixels(i + 500000, sizes[i], s, device, dtype), sizes[i], "image", ("b", i)) for i in range(n)]
    encoder.result(encoder.submit(items[:2]))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    tickets = [encoder.submit([item]) for item in items]
    forwards = encoder.step()
    for t in tickets:
        encoder.result(t)
    _sync(device)
    wall = time.perf_counter() - t0
    return {"requests": n, "patches": sum(sizes), "forwards": forwards, "wall_s": wall,
            "patches_per_s": sum(sizes) / wall, "images_per_s": n / wall}


def llm_alone(llm: LLMStep, device: torch.device, steps: int) -> float:
    llm.step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.step()
    _sync(device)
    return 1000 * (time.perf_counter() - t0) / steps


def failure_phase(encoder: LockstepEncoder, tower: TowerAdapter, s: Shape, device: torch.device,
                  dtype: torch.dtype, n: int) -> dict[str, Any]:
    """The service's path per item: early result, else on-demand encode, else the model's own method."""
    sizes = _request_sizes(s, n, 9)
    items = [EncodeItem(_pixels(("f", i), sizes[i], s, device, dtype), sizes[i], "image", ("f", i)) for i in range(n)]
    tickets = [encoder.submit([item]) for item in items]
    paths, sums = [], []
    for i, item in enumerate(items):
        try:
            out, path = encoder.result(tickets[i])[0], "early"
        except EncodeError:
            try:
                out, path = encoder.result(encoder.submit([item]))[0], "on_demand"
            except EncodeError:  # SGLang's own method: the same TP tower, called directly on every rank
                out, path = tower.vit.forward(item.pixel_values, [item.num_patches]), "fallback"
        paths.append(path)
        sums.append(float(out.float().sum()))
    return {"paths": paths, "checksums": sums, "agreed_failures": encoder.agreed_failures}


def _gather(obj: Any, group: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    s = SMOKE if args.smoke else GPU
    out_dir = Path(args.out)
    log = Log(out_dir / f"{args.name}.log", rank)
    result: dict[str, Any] = {"ok": False}

    def fire() -> None:
        log(f"WATCHDOG: run not finished after {args.watchdog_s}s (a hang): exiting with code 3")
        if rank == 0:
            result["watchdog_fired"] = True
            (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
        os._exit(3)

    watchdog = threading.Timer(args.watchdog_s, fire)
    watchdog.daemon = True
    watchdog.start()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # two ranks on a small CPU: no oversubscription
    dtype = torch.bfloat16
    timeout = timedelta(seconds=args.collective_timeout_s)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timeout, **({"device_id": device} if cuda else {}))
    cpu_group = dist.new_group(backend="gloo", timeout=timeout)  # agreement and result exchange: off the GPU
    agree_calls = {"n": 0, "s": 0.0}
    base_agree = process_group_agree(cpu_group)

    def agree(failed: bool) -> bool:
        t0 = time.perf_counter()
        try:
            return base_agree(failed)
        finally:
            agree_calls["n"] += 1
            agree_calls["s"] += time.perf_counter() - t0

    stream = torch.cuda.Stream(device) if cuda else None
    on_stream = (lambda: torch.cuda.stream(stream)) if cuda else contextlib.nullcontext
    hl_i = s.inter // world
    bytes_per_patch = (5 * s.hidden + 3 * hl_i) * 2
    config = CoalescerConfig(budget_bytes=s.budget_patches * bytes_per_patch, max_batch_items=s.max_items,
                             device=str(device))
    try:
        log(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, world {world}, shape {s}")
        vit_tp = TPViT(s, device, dtype, rank, world)
        tower = TowerAdapter(vit_tp, device, bytes_per_patch, rank)
        # 1. TP=2 equals the single-GPU (unsharded) tower.
        with on_stream():
            n_check = 8
            sizes = _request_sizes(s, n_check, 3)
            items = [EncodeItem(_pixels(("c", i), sizes[i], s, device, dtype), sizes[i], "image", ("c", i))
                     for i in range(n_check)]
            enc = LockstepEncoder(tower, config, agree=agree)
            tp_out = enc.result(enc.submit(items))
            vit_full = TPViT(s, device, dtype, 0, 1)
            full_out = vit_full.forward(torch.cat([it.pixel_values for it in items]), sizes).split(sizes)
            vit_fp32 = TPViT(s, device, torch.float32, 0, 1)
            ref32 = vit_fp32.forward(torch.cat([it.pixel_values for it in items]).float(), sizes).split(sizes)
            del vit_fp32
            errs = [_rel_err(a, b) for a, b in zip(tp_out, full_out, strict=True)]
            bf16_errs = [_rel_err(a, b) for a, b in zip(full_out, ref32, strict=True)]
            max_abs = max(float((a.float() - b.float()).abs().max()) for a, b in zip(tp_out, full_out, strict=True))
        check = {"items": n_check, "forwards": enc.forwards, "rel_err_max": max(errs), "abs_err_max": max_abs,
                 "single_gpu_bf16_vs_fp32_rel_err_max": max(bf16_errs), "tolerance_rel": args.tolerance}
        check["passed"] = check["rel_err_max"] <= args.tolerance
        result["tp_equals_single_gpu"] = check
        log(f"tp_equals_single_gpu: {check}")

        # 2. Throughput: TP=2 vs TP=1 (each rank alone on its GPU, full weights, no collective).
        llm_tp = LLMStep(s, device, dtype, rank, world)
        llm_solo = LLMStep(s, device, dtype, 0, 1)
        tower_solo = TowerAdapter(vit_full, device, (5 * s.hidden + 3 * s.inter) * 2, rank, fault_rank=-1)
        config_solo = CoalescerConfig(budget_bytes=s.budget_patches * tower_solo.bytes_per_patch,
                                      max_batch_items=s.max_items, device=str(device))
        throughput: dict[str, Any] = {}
        with on_stream():
            for label, tw, cfg, llm, ag in (("tp2", tower, config, llm_tp, agree),
                                            ("tp1", tower_solo, config_solo, llm_solo, None)):
                dist.barrier(group=cpu_group)
                enc = LockstepEncoder(tw, cfg, agree=ag)
                alone = encoder_alone(enc, s, s.bench_requests, device, dtype)
                step_ms = llm_alone(llm, device, 20 if args.smoke else 50)
                mixed = mixed_loop(LockstepEncoder(tw, cfg, agree=ag), llm, s, s.bench_requests, device, dtype,
                                   Jitter(rank, 0, enabled=False), seed=11)
                mixed.pop("checksums")
                throughput[label] = {"encoder_alone": alone, "llm_step_ms_alone": step_ms, "mixed_loop": mixed}
                log(f"throughput {label}: encoder {alone['patches_per_s']:.0f} patches/s "
                    f"({alone['images_per_s']:.1f} img/s); LLM step alone {step_ms:.3f} ms; mixed loop "
                    f"{mixed['iteration_ms']:.3f} ms/iteration, LLM step in loop {mixed['llm_step_ms_in_loop']}")
        tp2, tp1 = throughput["tp2"], throughput["tp1"]
        throughput["encoder_speedup_tp2_over_tp1"] = (tp2["encoder_alone"]["patches_per_s"]
                                                      / tp1["encoder_alone"]["patches_per_s"])
        throughput["llm_step_alone_ratio_tp2_over_tp1"] = tp2["llm_step_ms_alone"] / tp1["llm_step_ms_alone"]
        for label in ("tp1", "tp2"):
            t = throughput[label]
            t["iteration_slowdown_vs_llm_alone"] = t["mixed_loop"]["iteration_ms"] / t["llm_step_ms_alone"]
            if t["mixed_loop"]["llm_step_ms_in_loop"] is not None:
                t["llm_step_slowdown_in_loop"] = t["mixed_loop"]["llm_step_ms_in_loop"] / t["llm_step_ms_alone"]
        result["throughput"] = throughput

        # 3. Soak: thousands of requests, jittered per rank, TP=2 with agreement.
        dist.barrier(group=cpu_group)
        with on_stream():
            enc = LockstepEncoder(tower, config, agree=agree)
            tower.log.clear()
            collectives0 = vit_tp.collectives
            soak = mixed_loop(enc, llm_tp, s, s.soak_requests, device, dtype, Jitter(rank, s.jitter_s, True), seed=21)
        logs = _gather(_stable_hash(tower.log), cpu_group)
        sums = _gather(soak.pop("checksums"), cpu_group)
        slept = _gather(soak["jitter_slept_s"], cpu_group)
        soak.update({"forwards": enc.forwards, "tower_collectives": vit_tp.collectives - collectives0,
                     "forward_logs_equal": len(set(logs)) == 1, "outputs_bitwise_equal": sums[0] == sums[1],
                     "jitter_slept_s_per_rank": slept, "agreed_failures": enc.agreed_failures})
        soak["passed"] = soak["forward_logs_equal"] and soak["outputs_bitwise_equal"] and enc.agreed_failures == 0
        result["soak"] = soak
        log(f"soak: {soak}")

        # 4. Failure on rank 1 only.
        dist.barrier(group=cpu_group)
        n_fail = 12
        faulty = TowerAdapter(vit_tp, device, bytes_per_patch, rank, fault_rank=1, oom_keys={("f", 3)},
                              raise_keys={("f", 7)}, transient_oom_keys={("f", 10)})
        with on_stream():
            fail = failure_phase(LockstepEncoder(faulty, CoalescerConfig(
                budget_bytes=s.budget_patches * bytes_per_patch, max_batch_items=3, device=str(device)),
                agree=agree), faulty, s, device, dtype, n_fail)
        paths = _gather(fail["paths"], cpu_group)
        sums = _gather(fail["checksums"], cpu_group)
        fallbacks = [i for i, p in enumerate(fail["paths"]) if p == "fallback"]
        failure = {"paths_rank0": paths[0], "paths_equal": paths[0] == paths[1], "outputs_equal": sums[0] == sums[1],
                   "fallback_items": fallbacks, "agreed_failures": fail["agreed_failures"],
                   "injected_on_rank1": {"oom_persistent": 3, "raise_after_collectives": 7, "oom_transient": 10}}
        failure["passed"] = (failure["paths_equal"] and failure["outputs_equal"] and fallbacks == [3, 7]
                             and paths[0][10] == "on_demand")
        result["failure"] = failure
        log(f"failure: {failure}")
        result["agreement"] = {"calls": agree_calls["n"], "mean_us": 1e6 * agree_calls["s"] / max(1, agree_calls["n"])}
        result["ok"] = all(result[k]["passed"] for k in ("tp_equals_single_gpu", "soak", "failure"))
        dist.barrier(group=cpu_group)
    except BaseException:
        log("FAILED:\n" + traceback.format_exc())
        result["error"] = traceback.format_exc()
        raise
    finally:
        if rank == 0:
            result.update(meta(args, world, s, device))
            (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
        watchdog.cancel()
    log(f"done: ok={result['ok']}")
    dist.destroy_process_group()


def meta(args: argparse.Namespace, world: int, s: Shape, device: torch.device) -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except Exception:
        commit = "unknown"
    return {"command": " ".join([Path(sys.executable).name, "-m", "benchmarks.tp_nccl", *sys.argv[1:]]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit,
            "torch": torch.__version__, "world": world, "backend": "gloo" if device.type == "cpu" else "nccl",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "shape": asdict(s), "env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shapes (what CI runs)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="tp_nccl")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--watchdog-s", type=float, default=None, help="exit (code 3) if the run lasts longer")
    p.add_argument("--collective-timeout-s", type=float, default=60.0)
    p.add_argument("--tolerance", type=float, default=0.03, help="max relative error TP vs single-GPU (bf16)")
    args = p.parse_args(argv)
    if args.watchdog_s is None:
        args.watchdog_s = 150.0 if args.smoke else 225.0
    if not args.smoke and torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, found {torch.cuda.device_count()}; use --smoke on CPU", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.log").write_text("")
    import torch.multiprocessing as mp

    try:
        mp.spawn(worker, args=(args.world, free_port(), args), nprocs=args.world, join=True)
    except Exception as exc:  # a rank failed or its watchdog fired
        print(f"tp_nccl: a rank failed: {exc}", file=sys.stderr)
        return 1
    report = json.loads((out / f"{args.name}.json").read_text())
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
