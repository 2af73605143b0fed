"""The project's serving benchmark: a real ``sglang.launch_server`` with the plugin off and on, driven by
SGLang's own load generator (``sglang.benchmark.serving``), on one GPU.

Runs on the GPU machine (no network) after ``scripts/gpu_serve/prepare.sh`` built ``.gpu-serve/`` (the
wheel closure of sglang 0.5.16 and the stripped sglang-kernel) on a networked one; ``make gpu-serve`` calls it.

All compared servers (``--variants``, default plugin off and on) run at once on the one GPU with identical
flags apart from their variant's (same ``--max-total-tokens``, so the same KV pool). Only one server has
load at a time; the order alternates between repetitions, and each repetition has its own ``--seed``
(the same requests for every server), so neither the radix cache nor the embedding cache sees an image
twice. SGLang's load generator stays in one process (``loadgen.py``). Everything a run produced is packed
into ``--out``/gpu-serve-<family>.tar.xz: ``bench-*.jsonl`` (SGLang's own result lines), ``metrics-*.txt``
(``/metrics`` before/after), ``requests-*`` (SGLang's per-request export), server logs, and
``results.json`` (also copied beside it: what ``summarize.py`` turns into ``real_server_summary.json``).

usage: python3 scripts/gpu_serve/serve.py --family qwen2_5_vl_7b --out DIR [--variants off,on]
       [--workloads correct,lone,seed,poisson] [--runs 3] [--budget-s 560]

Environment: GPU_SERVE_LOADS (Poisson loads as fractions of plugin-off capacity, default 0.5,0.8,0.25,1.0),
GPU_SERVE_POISSON_S (seconds of arrivals a load, default 12), GPU_SERVE_CAPACITY (plugin-off capacity in req/s,
e.g. an earlier run's ``capacity_req_s``: skips the capacity run), GPU_SERVE_COMMIT (the commit to record),
GPU_SERVE_PROFILE (workloads to stack-sample), GPU_SERVE_EXTRA_FLAGS (server flags for every variant: a study),
GPU_SERVE_MAX_TOTAL_TOKENS (a smaller KV pool for every server, so that two fit an 80 GB H100).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from exports import arrival_span, last_finisher, measured_records, request_records
from pack import unpack_changed
from stack_samples import SCHEDULER_TITLE, StackSampler, descendants, descendants_titled

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SITE = Path(os.environ.get("GPU_SERVE_SITE", "/tmp/gpu-serve-site"))        # sglang 0.5.16 + closure
PY_SPY = SITE / "bin" / "py-spy"  # from a py-spy wheel among the carried ones (stack_samples.py)
PROFILE = {w for w in os.environ.get("GPU_SERVE_PROFILE", "").split(",") if w}  # workloads to stack-sample
PLUGIN_SITE = Path(os.environ.get("GPU_SERVE_PLUGIN_SITE", "/tmp/gpu-serve-plugin"))  # the built wheel
PATCHES = HERE / "sglang_backports"  # sitecustomize + server patches (fixes from later SGLang, the free encoder)
T0 = time.monotonic()

# Model families the harness serves on sglang 0.5.16: builder preset, plugin config, KV tokens per server.
# KV tokens fit four servers' weights + KV in an H200 (Qwen2.5-VL-7B: 16.6 GB + 11.5 GB each), except where
# server_gib says fewer fit (see exceeds_the_gpu).
FAMILIES = {
    # KV: 28 layers x 4 KV heads x 128 x (K, V) x 2 bytes = 56 KiB a token (build_model.py's 7B config)
    "qwen2_5_vl_7b": {"config": "qwen2_5_vl", "max_total_tokens": 200_000, "flags": [], "video": True,
                      "kv_bytes_per_token": 57_344},
    # KV: 36 layers x 8 KV heads x 128 x (K, V) x 2 bytes = 144 KiB a token
    "qwen3_vl_8b": {"config": "qwen3_vl", "max_total_tokens": 150_000, "flags": [], "video": True, "server_gib": 42.5,
                    "kv_bytes_per_token": 147_456},
    # SGLang 0.5.16 turns multimodal off for Gemma3 unless asked (scripts/gpu_serve/NOTES.md)
    # 23.1 GB weights + 14.6 GB KV + the tower's and the prefill's activations, an estimate: three servers have
    # always fit, and a fourth found no memory left for its KV cache at 351b609 (SGLang refused to start it).
    # KV: 48 layers x 8 KV heads x 256 x (K, V) x 2 bytes = 384 KiB a token (14.6 GiB at 40,000; every layer a full
    # pool on 0.5.16, sliding or not)
    "gemma3_12b": {"config": "gemma3", "max_total_tokens": 40_000, "flags": ["--enable-multimodal"],
                   "server_gib": 40.0, "kv_bytes_per_token": 393_216},
    # Gemma 4 (Gemma4ForConditionalGeneration): multimodal on by default; COMMON_FLAGS' --attention-backend triton
    # is required (0.5.16 asserts triton/trtllm_mha, and only triton gets the bidirectional image mask), and
    # --mm-attention-backend triton_attn keeps the tower off fa3 (not in the stripped sglang-kernel). Hybrid SWA
    # pools: full = max_total_tokens, SWA = 0.8 x that (E4B: 84 KiB a token -> 12.0 GiB + 14.9 GiB weights).
    # Measured at 9ca7bdd: 30.4-33.1 GiB a scheduler and 0.5-1.2 GiB its main process's CUDA context; four servers
    # with eight cuda_ipc tokenizer workers beside them ran the GPU out of memory mid-seed (7 requests failed), so
    # four fit only without cuda_ipc workers, three with up to eight.
    "gemma4_e4b": {"config": "gemma4", "max_total_tokens": 150_000, "flags": [], "video": True, "server_gib": 34.3,
                   "kv_bytes_per_token": 84 * 1024},
    "gemma4_e2b": {"config": "gemma4", "max_total_tokens": 200_000, "flags": [], "video": True},  # 6.9 + 9.5 GiB
}
COMMON_FLAGS = [
    "--load-format", "dummy", "--host", "127.0.0.1", "--dtype", "bfloat16",
    "--attention-backend", "triton", "--mm-attention-backend", "triton_attn", "--sampling-backend", "pytorch",
    "--grammar-backend", "none", "--disable-cuda-graph", "--disable-piecewise-cuda-graph", "--random-seed", "0",
    "--context-length", "8192", "--chunked-prefill-size", "8192", "--max-running-requests", "128",
    "--skip-server-warmup", "--enable-metrics", "--enable-request-time-stats-logging", "--log-level", "info",
]
# SGLang flags added to every server of a run, plugin on and off alike (GPU_SERVE_EXTRA_FLAGS, split on spaces),
# for studies of the harness itself, e.g. --sleep-on-idle against the lone-decode gap. Recorded in results.json as
# extra_flags; summarize.merge_runs refuses such a run (keep it out of the Makefile's REAL_SERVER_RUNS).
EXTRA_FLAGS = os.environ.get("GPU_SERVE_EXTRA_FLAGS", "").split()
# Every server gets the same flags apart from its variant's; all start at once. --mem-fraction-static only
# bounds what a server may take (SGLang sizes the static pool from the memory free when it profiles, which
# depends on when the others allocate); --max-total-tokens fixes the KV pool, so every server gets the same
# one whichever profiles first (4 x (weights + KV) fits an H200 with room for activations).
MEM_FRACTION = "0.85"
# What the GPU holds for the servers (an H200: 139.8 GiB) and what a family's server takes at a burst's peak
# (FAMILIES' server_gib; where a family gives none, four servers have always fit). Qwen3-VL-8B: 41.2-43.9 GiB
# a scheduler (16.5 GB weights + 20.6 GB KV + activations; a fourth server ran out of memory at eea0358). Each tokenizer
# worker of --tokenizer-worker-num with --mm-feature-transport cuda_ipc holds a CUDA context of its own: 1.05-1.14
# GiB each at 2279e05, where three such Qwen3-VL servers (12 workers) ran out of memory mid-seed.
GPU_GIB = 139.8
TOKENIZER_WORKER_GIB = 1.15


def kv_tokens(family: str) -> int:
    """Every server's KV pool in tokens: the family's, or GPU_SERVE_MAX_TOTAL_TOKENS (a study on a smaller GPU;
    recorded in results.json as max_total_tokens, which the summary names beside every ratio it gave)."""
    given = os.environ.get("GPU_SERVE_MAX_TOTAL_TOKENS", "").strip()
    if not given:
        return FAMILIES[family]["max_total_tokens"]
    if "kv_bytes_per_token" not in FAMILIES[family]:
        raise ValueError(f"GPU_SERVE_MAX_TOTAL_TOKENS: {family}'s KV bytes a token are not recorded (FAMILIES), so "
                         "what its servers would take cannot be checked against the GPU")
    if not given.isdigit() or int(given) <= 0:
        raise ValueError(f"GPU_SERVE_MAX_TOTAL_TOKENS={given!r}: give every server's KV pool in tokens, a whole "
                         "number > 0 (e.g. 100000)")
    return int(given)


def gpu_gib() -> float:
    """The GPU's memory in GiB (nvidia-smi), or an H200's where there is none to ask (the harness's tests)."""
    if shutil.which("nvidia-smi") is None:
        return GPU_GIB
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return float(out[0]) / 1024 if out else GPU_GIB


@dataclass(frozen=True)
class Variant:
    """One compared server: plugin on or off, plus what it changes beyond that (same for every family)."""

    plugin: bool
    flags: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)  # merged over the family's shipped YAML (plugin on only)
    env: dict = field(default_factory=dict)
    patches: tuple[str, ...] = ()  # modules of sglang_backports/ this server installs (GPU_SERVE_PATCHES)


TOK4IPC = ("--tokenizer-worker-num", "4", "--mm-feature-transport", "cuda_ipc")
# SGLang's SDPA vision attention (cuDNN's flash kernel on an H200) in place of COMMON_FLAGS' triton_attn, whose kernel
# took 86 % of a Gemma3-12B crop's 58-62 ms against 15-17 ms on SDPA (benchmarks/vision_attention_backends.py,
# 9ca7bdd): an encoder nearer production's fa3, which the stripped sgl-kernel leaves out. The last flag counts.
MMSDPA = ("--mm-attention-backend", "sdpa")
# "off"/"on" are the issue's comparison (SGLang defaults). The "+tok4ipc" pair adds SGLang's own answers to
# its preprocessing bottleneck (4 tokenizer workers, features handed over through CUDA IPC) to both, to show
# what the plugin adds once that bottleneck is gone. "off+vitgraph" is SGLang's own ViT CUDA graph
# (Qwen towers; the plugin declines to run beside it), "on+defer20"/"on+defer2s" the plugin's prefill deferral,
# "on+lazy1" encoding at arrival only behind a waiting request (no head start otherwise: Poisson arrivals),
# "on+queue4m" a queue limit that holds a whole seed burst (gemma3 ships it since a1a344c), "on+graphs" the
# plugin's own ViT CUDA graphs.
VARIANTS = {
    "off": Variant(False),
    # Plain plugin-off again under another name: how far two identical servers of one run drift apart (decode speed
    # differs between the servers of a run, e.g. Gemma 4 Poisson 50 % median ITL 38-41 against 57-61 ms at 717967f).
    "off+twin": Variant(False),
    "on": Variant(True),
    "off+tok4ipc": Variant(False, TOK4IPC),
    "on+tok4ipc": Variant(True, TOK4IPC),
    # SGLang's flags without the plugin, with 0.5.23's move of features to the tower's device backported
    # (sglang_backports/feature_device.py): unpatched, 0.5.16's Qwen3-VL scheduler died with them (e12f02a).
    "off+tok4ipc+backport": Variant(False, TOK4IPC, patches=("feature_device",)),
    # The floor of any encoder scheduling (sglang_backports/free_encoder.py): SGLang's own server whose vision
    # encoder costs nothing (zeros of the right shape after one real call), preprocessing and LLM unchanged.
    "off+freeenc": Variant(False, patches=("free_encoder",)),
    "off+tok4ipc+freeenc": Variant(False, TOK4IPC, patches=("feature_device", "free_encoder")),
    "off+vitgraph": Variant(False, env={"SGLANG_VIT_ENABLE_CUDA_GRAPH": "1"}),
    "on+defer20": Variant(True, config={"sglang": {"defer_prefill_ms": 20}}),
    # Deferral bounded by the prefill wait (2 s): a request sits out while its encode runs, also when nothing else
    # can run (the scheduler then waits outside the prefill in slices and keeps taking requests in).
    "on+defer2s": Variant(True, config={"sglang": {"defer_prefill_ms": 2000}}),
    # Both: a request with nobody waiting ahead is left to its prefill (inline when the coalescer is idle), a burst
    # is encoded at arrival and its prefills wait for their encodes outside the prefill.
    "on+lazy1+defer2s": Variant(True, config={"sglang": {"early_encode_min_waiting": 1, "defer_prefill_ms": 2000}}),
    # The deferral on top of SGLang's tokenizer workers: below the tokenizer manager's floor (README, "When the first
    # token leaves"); compare with off+tok4ipc.
    "on+tok4ipc+defer2s": Variant(True, TOK4IPC, config={"sglang": {"defer_prefill_ms": 2000}}),
    # What `mm-scheduler tune` proposed from Qwen3-VL's on+tok4ipc seed run (e12f02a): 63 % of the 30 forwards held
    # more than 16 units against the cap of 32 while the budget had room. The encoder had a backlog the whole run
    # there, so bigger forwards may also delay the first prefills: measured, not assumed.
    "on+tok4ipc+items64": Variant(True, TOK4IPC, config={"max_batch_items": 64}),
    # A short lead for the encoder (643572e): against off+tok4ipc+backport, on+tok4ipc's first prefills ran late
    # while the coalescer encoded the burst ahead of them on a saturated GPU (first chunks p10 7.3 s against 4.1 s,
    # p90 equal). Results encoded ahead may pin 1 GiB by default: ~145 Qwen3-VL-8B images of 900 patches (7.4 MB
    # each with the deepstack outputs), ~24 requests. 192 MB is ~27 images, ~4 requests; later arrivals wait in
    # arrival order and are admitted as prefills consume results.
    "on+tok4ipc+held192m": Variant(True, TOK4IPC, env={"MM_COALESCER_MAX_HELD_MB": "192"}),
    # Results handed over as soon as their forward is queued on the encoder stream (handover: enqueued); the
    # prefill's stream waits for the encoder's event on the GPU instead of the scheduler thread waiting on the host
    # (643572e: 35-39 ms a lone prefill, 0.41 s a seed run), so SGLang's loop keeps running ahead of the GPU.
    "on+tok4ipc+enqueued": Variant(True, TOK4IPC, config={"handover": "enqueued"}),
    # The plugin's own way below that floor: preprocessing on a thread of its own (integration/preprocess.py).
    "on+prethread": Variant(True, config={"sglang": {"preprocess_thread": True}}),
    # The plugin with preprocessing left on SGLang's loop: configs/qwen3_vl.yaml ships preprocess_thread since db1d93c
    # (f4d38f4's runs), so on Qwen3-VL "on+prethread" is plain "on" and this is the lever turned off.
    "on+noprethread": Variant(True, config={"sglang": {"preprocess_thread": False}}),
    "on+prethread+defer2s": Variant(True, config={"sglang": {"preprocess_thread": True, "defer_prefill_ms": 2000}}),
    "on+lazy1": Variant(True, config={"sglang": {"early_encode_min_waiting": 1}}),
    # Room for a whole seed burst of Gemma3 crops (600 x 4,096 patches): the shipped 500,000 refused ~half.
    "on+queue4m": Variant(True, config={"max_queue_patches": 4_000_000}),
    # What `mm-scheduler tune` proposed from Gemma 4's seed run (c704fd5): every forward filled > 90 % of the 2 GiB
    # budget (3 of the 2,520-patch images), so twice the budget lets a batch of 6 run whole.
    "on+budget4g": Variant(True, config={"budget_bytes": 4 * 1024**3}),
    # The plugin's own ViT CUDA graphs (Qwen towers): buckets a seed request (6 images, 5,400-6,936 patches) and
    # a coalesced burst fill; a batch is cut into runs by the buckets (vit_graphs.cut_into_runs).
    # configs/qwen2_5_vl.yaml ships these buckets since 3f292ad, so on Qwen2.5-VL this variant is plain "on".
    "on+graphs": Variant(True, config={"sglang": {"vit_graph_patches": [4096, 8192, 16384, 28672]}}),
    # Buckets sized to Poisson traffic on Qwen3-VL (1a3705d, H100, 50 % load): 48 forwards of 1.5 images, 2,448
    # patches on average (5 under 1,024, 18 to 2,048, 21 to 4,096, 4 to 8,192), each 44 ms of which 38 ms were its
    # host launch beside the scheduler's thread (launch-bound, GIL), and the prefill blocked on it for all of it.
    # An eager forward there is ~2,350 aten ops (SGLang 0.5.16's tower, counted on CPU), whatever its images. The
    # buckets are what `mm-scheduler tune` proposes from that run's scrape; a seed burst's larger batches are cut
    # into runs of them (vit_graphs.cut_into_runs).
    "on+graphs-small": Variant(True, config={"sglang": {"vit_graph_patches": [2048, 4096, 8192]}}),
    # Both changes tune proposes from that scrape: the same graphs, and encoding at arrival only behind a queue, so
    # a prefill that finds the coalescer idle replays the graphs inline on the scheduler's thread (no hop, no second
    # thread launching beside it), as qwen2_5_vl ships.
    "on+graphs-small+lazy1": Variant(True, config={"sglang": {"vit_graph_patches": [2048, 4096, 8192],
                                                              "early_encode_min_waiting": 1}}),
    # The two levers that each cut Qwen3-VL's Poisson TTFT on their own path: graphs sized to Poisson forwards (the
    # encoder's host launch) and preprocessing on the plugin's thread (the tokenizer manager's loop).
    "on+graphs-small+prethread": Variant(True, config={"sglang": {"vit_graph_patches": [2048, 4096, 8192],
                                                                  "preprocess_thread": True}}),
    # Gemma 4's graphs (integration/uniform_graphs.py): batches of 1-3 default-budget images of 2,520 patches, what the
    # 2 GiB budget holds at the ~270 KB a patch measured there (a7ce4a5); alone, and with inline replays when idle.
    # configs/gemma4.yaml ships these buckets since 5178309's run, so on Gemma 4 "on+g4graphs" is plain "on".
    "on+g4graphs": Variant(True, config={"sglang": {"vit_graph_patches": [2520, 5040, 7560]}}),
    # Gemma3's graphs (SigLIP crops of 4,096 patches): batches of 1, 2, 4 and 8 crops; 8 take ~1.4 GB at the 43,460
    # bytes a patch calibrated there (1756d96), inside the 2 GiB budget (one pool of 1,552 MiB at 351b609).
    # configs/gemma3.yaml ships these buckets since 351b609's run, so on Gemma3 "on+g3graphs" is plain "on".
    "on+g3graphs": Variant(True, config={"sglang": {"vit_graph_patches": [4096, 8192, 16384, 32768]}}),
    "on+g3graphs+lazy1": Variant(True, config={"sglang": {"vit_graph_patches": [4096, 8192, 16384, 32768],
                                                          "early_encode_min_waiting": 1}}),
    # The plugin without the graphs (Qwen2.5-VL, Gemma3, Gemma 4) and the inline path (Qwen2.5-VL, Gemma 4) their
    # configs ship: the baseline those settings were measured against, now that "on" includes them there.
    "on+plain": Variant(True, config={"sglang": {"vit_graph_patches": [], "early_encode_min_waiting": 0}}),
    # Qwen3-VL's shipped shape (no graphs, encode at arrival, preprocessing on the plugin's thread) on the families
    # that ship graphs or the inline path: does what won on Qwen3-VL win there too?
    "on+plain+prethread": Variant(True, config={"sglang": {"vit_graph_patches": [], "early_encode_min_waiting": 0,
                                                           "preprocess_thread": True}}),
    "on+g4graphs+lazy1": Variant(True, config={"sglang": {"vit_graph_patches": [2520, 5040, 7560],
                                                          "early_encode_min_waiting": 1}}),
    # The plugin with SGLang's streams left at their own priority (every shipped config creates them high): the one
    # difference a plugin server's decode has from plugin-off's while the plugin is idle (the lone-decode gap).
    "on+prio0": Variant(True, config={"sglang": {"llm_stream_priority": "default"}}),
    # Gemma 4's shipped config with graphs of up to 8 images: with the position lookup (351b609) a patch calibrates
    # at ~44,700 bytes, so 8 images (20,160 patches, ~0.9 GB) fit the 2 GiB budget, and a burst's forwards of 13-15
    # images become 2 replays instead of 5.
    "on+g4graphs8": Variant(True, config={"sglang": {"vit_graph_patches": [2520, 5040, 7560, 10080, 15120, 20160]}}),
    # One torch (OpenMP) intra-op thread in every process of the server, as SGLang's own tokenizer workers set for
    # themselves (0.5.16 TokenizerWorker: torch.set_num_threads(1)) and its single tokenizer manager does not: that
    # process used 84-93 CPU-s for a 600-image burst, the four workers 11 (2729c81); a study of that gap.
    "off+omp1": Variant(False, env={"OMP_NUM_THREADS": "1"}),
    "on+omp1": Variant(True, env={"OMP_NUM_THREADS": "1"}),
    # Gemma 4's pixels from the tokenizer manager as float32, SGLang's own format: sglang.uint8_pixels (on by default
    # since it won at e09d266, variant "on+u8" then) turned off, its lever measured against plain "on". Other
    # families: the same server as "on" (their processors normalize; a start-up line says so).
    "on+f32": Variant(True, config={"sglang": {"uint8_pixels": False}}),
    "on+tfcheck": Variant(True, config={"sglang": {"fast_mm_token_check": False}}),
    # The tokenizer manager's process on one torch thread (sglang.tokenizer_torch_threads), as SGLang's tokenizer
    # workers run: that process used 82-93 CPU-s for a 100-request Qwen2.5-VL burst of ~12 s (660b520), the
    # scheduler's 14-16. Unlike off+omp1/on+omp1 (OMP_NUM_THREADS=1 in every process) the scheduler keeps its threads.
    "on+tmthreads1": Variant(True, config={"sglang": {"tokenizer_torch_threads": 1}}),
    # The lever taken back out where the shipped config sets it (qwen2_5_vl, gemma4, gemma3: 1): torch's own thread
    # count in the tokenizer manager, the plugin otherwise as shipped (the same server as "on" for qwen3_vl).
    "on+tmthreadsdefault": Variant(True, config={"sglang": {"tokenizer_torch_threads": None}}),
    # SGLang's own GPU hash of a request's features (SGLANG_MM_BUFFER_SIZE_MB > 0: 0.5.16 schedule_batch copies them
    # into a float32 GPU buffer, hashes them there and copies them back) against the CPU SHA-256 of every pixel byte
    # on the scheduler's main thread (3.3-3.4 s of a Gemma 4 burst, session 22's stacks). Uint8 pixels step aside there.
    "off+mmbuf": Variant(False, env={"SGLANG_MM_BUFFER_SIZE_MB": "256"}),
    "on+mmbuf": Variant(True, env={"SGLANG_MM_BUFFER_SIZE_MB": "256"}),
    # SGLang's PIL image processor on the CPU in place of its fast one on the GPU (--disable-fast-image-processor):
    # whether the tokenizer manager's GPU work, time-sliced with the scheduler's, is what it waits on in a burst. More
    # CPU (Gemma 4: 86 ms a 6-image request on one thread of this VM) and other resize arithmetic: timing only, its
    # greedy replies are not expected to equal off's.
    "off+pilproc": Variant(False, ("--disable-fast-image-processor",)),
    # Both servers, and the floor, with the faster vision attention (MMSDPA). On Gemma3 the shipped graphs capture
    # SigLIP on SDPA too (the adapter unsets its flatten_batch, so a batch of crops is one forward); on+mmsdpa+eager
    # is the same server without them, the graphs' lever on that backend.
    "off+mmsdpa": Variant(False, MMSDPA),
    "on+mmsdpa": Variant(True, MMSDPA),
    "on+mmsdpa+eager": Variant(True, MMSDPA, config={"sglang": {"vit_graph_patches": []}}),
    "off+mmsdpa+freeenc": Variant(False, MMSDPA, patches=("free_encoder",)),
}
# Every variant runs every workload and load; serve.py skips a Poisson load the deadline cannot hold for all servers.
POISSON_MAX = 200  # requests in a Poisson pool (a run takes the first n)
# The capacity a Poisson pool is built for when the run measures it (above every capacity measured: Qwen2.5-VL-7B
# 13.7 req/s on an H200). A load needing more than its pool has it rebuilt before either server's run (prime_pool).
POOL_CAPACITY_REQ_S = 14.0
POISSON_DRAIN_S = 25.0
"""A Poisson run's wall time beyond its arrivals (n / rate): the drain, the load generator's start and its scrapes.
Measured at 50-80 % load: 8-10 s on the Qwen families, 12-14 s on Gemma 4, 17-21 s on Gemma3-12B (86aa9fc)."""
CAPACITY_RUN_S = 75.0
"""Plugin-off's capacity run (120 requests at once): 68 s on Gemma3-12B (2729c81), 25 s on Gemma 4 E4B (86aa9fc)."""


def teardown_reserve(servers: int) -> float:
    """Seconds a command needs after its last run: stopping each server and packing the raw files. Measured: 46 s
    for four Gemma 4 servers (86aa9fc); three Gemma3-12B servers took more than 31 s, and that command, whose
    560 s budget did not count them, hit the device's 600 s limit and lost its raw files."""
    return 10.0 + 12.0 * servers


def command_deadline(start: float, budget_s: float, servers: int) -> float:
    """When the last run must end for the whole command (runs, teardown) to fit ``budget_s`` from ``start``."""
    return start + budget_s - teardown_reserve(servers)


# The longest a measured run may take beyond its arrivals (Gemma3's seed burst, the slowest so far, ~70 s a server).
# A server that takes requests and never answers (Qwen3-VL-8B with --tokenizer-worker-num 4 --mm-feature-transport
# cuda_ipc, c704fd5: its scheduler had died, as e12f02a's log showed for the same server at the same point) held the
# load generator until the device command was killed, and every raw file was lost.
RUN_TIMEOUT_S = float(os.environ.get("GPU_SERVE_RUN_TIMEOUT_S", "150"))
WATCH_INTERVAL_S = 2.0  # how often a measured run checks its server log for a dead scheduler


def exceeds_the_gpu(family: str, variants: list[str]) -> str | None:
    """Why these servers would not fit the GPU at once, or None: every server and its tokenizer workers' CUDA
    contexts (cuda_ipc transport only) against the GPU's memory (:func:`gpu_gib`), so a run is refused here, not lost
    to an OOM mid-seed."""
    spec = FAMILIES[family]
    server_gib = spec.get("server_gib")
    if server_gib is None:  # not measured: the four servers every such family has run
        return None if len(variants) <= 4 else f"{family}: at most 4 servers fit the GPU at once, got {len(variants)}"
    workers = 0
    for name in variants:
        flags = [*EXTRA_FLAGS, *VARIANTS[name].flags]  # as on its command line, where the last one counts
        if "cuda_ipc" in flags and "--tokenizer-worker-num" in flags:
            last = max(i for i, flag in enumerate(flags) if flag == "--tokenizer-worker-num")
            workers += int(flags[last + 1])
    server_gib -= (spec["max_total_tokens"] - kv_tokens(family)) * spec.get("kv_bytes_per_token", 0) / 2**30
    need = len(variants) * server_gib + workers * TOKENIZER_WORKER_GIB
    have = gpu_gib()
    if need <= have:
        return None
    return (f"{family}: {len(variants)} servers ({server_gib:.1f} GiB each) and {workers} CUDA-IPC tokenizer workers "
            f"({TOKENIZER_WORKER_GIB:g} GiB each) need {need:.1f} GiB, more than the GPU's {have:.1f}: "
            f"drop a variant from --variants {','.join(variants)}")


def workload_value(workload: list[str], flag: str, default: str) -> str:
    """A load generator flag's value in ``workload`` (which also holds flags without a value)."""
    return workload[workload.index(flag) + 1] if flag in workload else default


def run_timeout(workload: list[str]) -> float:
    """RUN_TIMEOUT_S, plus the time a paced run spends arriving (``--num-prompts`` over ``--request-rate``)."""
    rate = float(workload_value(workload, "--request-rate", "inf"))
    prompts = int(workload_value(workload, "--num-prompts", "0"))
    return RUN_TIMEOUT_S + (prompts / rate if rate != float("inf") else 0.0)


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: |:?$)")  # "RuntimeError: ...", "torch.OutOfMemoryError: ..."
# SGLang's processes log their last words so: Scheduler, TokenizerManager, DetokenizerManager, MultiTokenizerRouter,
# DataParallelController (0.5.16 and 0.5.23, srt/managers/).
PROCESS_DIED = re.compile(r"(\w+) hit an exception")


def server_failure(log_text: str) -> str | None:
    """What ended one of an SGLang server's processes, from its log: "<process>: <exception>" for the first
    "... hit an exception" traceback (the cause: the processes that die after it die of it; the outer exception
    when chained), or else a fatal error line. The HTTP server outlives a dead scheduler (0.5.16: its requests
    then never finish), so the log is where a hang's cause is."""
    died = PROCESS_DIED.search(log_text)
    if died:
        found = None
        for line in log_text[died.end():].splitlines()[1:]:
            if not line.strip() or line[0].isspace() or line.startswith(
                    ("Traceback", "During handling of the above", "The above exception")):
                continue  # frames, code, blank lines and the links of a chain
            if not EXCEPTION_LINE.match(line):
                if found:
                    break  # the traceback is over
                continue
            found = line.strip()
        return f"{died.group(1)}: {found or 'see the server log'}"
    return next((ln.strip() for ln in reversed(log_text.splitlines()) if "Fatal Python error" in ln), None)


REQUEST_ERROR = re.compile(r"^Error in request: (.*)$", re.M)  # 0.5.16's tokenizer side, before its traceback


def shortfall(run: dict, log_text: str) -> str | None:
    """Why a run is not a measurement, or None: fewer requests completed than were sent. The load generator
    leaves failed requests out of its latencies (a run of 93 fast successes and 7 failures would look faster),
    so such a run is recorded as failed, with the server's first request error (e.g. CUDA out of memory in a
    tokenizer worker's GPU processor)."""
    completed = run.get("completed") or 0
    if completed >= run["requested"]:
        return None
    errors = REQUEST_ERROR.findall(log_text)
    cause = f": {errors[0][:300]}" if errors else " (no request error in the server log)"
    return f"{run['requested'] - completed} of {run['requested']} requests failed{cause}"


def read_from(path: Path, offset: int) -> str:
    """A log's text from byte ``offset`` on ("" while it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


SEED_WORKLOAD = ["--dataset-name", "image", "--image-count", "6", "--image-resolution", "480x480",
                 "--random-input-len", "50", "--random-output-len", "10", "--random-range-ratio", "1.0"]
POISSON_WORKLOAD = ["--dataset-name", "image", "--image-count", "2", "--random-image-count",
                    "--image-resolution", "random:256x256-1024x1024", "--random-input-len", "128",
                    "--random-output-len", "128", "--random-range-ratio", "1.0"]


LOG_COPY: Path | None = None  # --out/serve.log: returned with the other files even when the command is killed


def log(msg: str) -> None:
    line = f"[gpu-serve +{time.monotonic() - T0:5.0f}s] {msg}"
    print(line, flush=True)
    if LOG_COPY is not None:
        with LOG_COPY.open("a") as f:
            f.write(line + "\n")


def http(method: str, url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        return 0, str(exc)


# --- installation (idempotent on a warm machine) ---------------------------------------------------------
def install(prepared: Path) -> None:
    """sglang 0.5.16's closure into ``SITE`` and the plugin's wheel into ``PLUGIN_SITE``, from what was carried.

    ``.gpu-serve-pack`` (``pack.py``) is what a command carries: its sglang-kernel and wheels replace whatever a warm
    machine kept from another pack (``unpack_changed``). A command that carries no pack relies on a warm machine's
    copies."""
    pack = REPO / ".gpu-serve-pack"
    kernel = pack / "sk.txz"
    if kernel.exists():
        unpack_changed(kernel, prepared, "sk")
    elif not (prepared / "sk").exists():
        sys.exit(f"no sglang-kernel in {prepared}/sk and no {kernel}: carry .gpu-serve-pack (the machine was not warm)")
    if (pack / "whl.txz").exists():
        unpack_changed(pack / "whl.txz", prepared, "whl")
    wheels = sorted((prepared / "whl").glob("*.whl"))
    if not wheels:
        sys.exit(f"no wheels in {prepared}/whl and no {pack / 'whl.txz'}: run scripts/gpu_serve/prepare.sh on a "
                 "networked machine first")
    key = hashlib.md5("".join(w.name for w in wheels).encode()).hexdigest()
    stamp = SITE / ".gpu-serve-wheels"
    if not (stamp.exists() and stamp.read_text() == key):
        shutil.rmtree(SITE, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(SITE), *map(str, wheels)], check=True)
        stamp.write_text(key)
        log(f"installed {len(wheels)} wheels into {SITE}")
    # The plugin as an operator installs it: a wheel built from this checkout, in its own site dir, so the
    # plugin-off server does not even have it on its path.
    shutil.rmtree(PLUGIN_SITE, ignore_errors=True)
    build = Path("/tmp/gpu-serve-wheel")
    shutil.rmtree(build, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(build), str(REPO)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                    str(PLUGIN_SITE), *map(str, build.glob("*.whl"))], check=True)
    log(f"built and installed {next(build.glob('*.whl')).name} into {PLUGIN_SITE}")


def environment(prepared: Path, plugin: bool, patches: tuple[str, ...] = ()) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(SITE), str(prepared / "sk")]
    if plugin:
        path.insert(0, str(PLUGIN_SITE))
    if patches:
        path.insert(0, str(PATCHES))
    extra = os.environ.get("GPU_SERVE_EXTRA_PATH")  # e.g. a probe-only shim, never in the headline runs
    if extra:
        path.insert(0, extra)
    if not any(importlib.util.find_spec(m) for m in ("torchcodec", "decord")):
        path.append(str(HERE / "video_shim"))  # the video request's decoder (video_shim/decord/__init__.py)
    env["PYTHONPATH"] = ":".join(path)
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1", "SGLANG_IS_FLASHINFER_AVAILABLE": "false",
        "TVM_FFI_CACHE_DIR": "/tmp/jitcache", "TRITON_CACHE_DIR": "/tmp/triton-cache",
        # plugin off: SGLang's loader skips every plugin not named here (and the wheel is not on the path)
        "SGLANG_PLUGINS": os.environ.get("GPU_SERVE_PLUGINS", "mm_coalescer") if plugin else "none",
        "GPU_SERVE_PATCHES": ",".join(patches),
    })
    for key in ("MM_COALESCER", "MM_COALESCER_CONFIG"):
        env.pop(key, None)
    nvcc = shutil.which("nvcc") or next((str(p) for p in Path("/usr/local").glob("cuda*/bin/nvcc")), None)
    if nvcc:  # sglang's JIT kernels (rope, activation, KV store) compile with nvcc on first use
        env["PATH"] = f"{Path(nvcc).parent}:{env['PATH']}"
        env.setdefault("CUDA_HOME", str(Path(nvcc).parents[1]))
    return env


def merge_config(base: dict, changes: dict) -> dict:
    """``changes`` on top of a config's values, section by section (a variant's config on the shipped one)."""
    return {**base, **{k: merge_config(base.get(k) or {}, v) if isinstance(v, dict) else v for k, v in changes.items()}}


def shipped_config(name: str) -> dict:
    """The values of the shipped config ``name`` (mm_scheduler/configs) in this checkout."""
    import yaml

    return yaml.safe_load((REPO / "mm_scheduler" / "configs" / f"{name}.yaml").read_text())


def plugin_config_name(family: str) -> str:
    """The shipped config a family's plugin servers start from, by name as an operator gives it (the YAML in the
    installed wheel): the family's, or GPU_SERVE_CONFIG's."""
    return os.environ.get("GPU_SERVE_CONFIG", FAMILIES[family]["config"])


def merged_config(name: str, changes: dict, dest: Path) -> Path:
    """The shipped config ``name`` with ``changes`` merged in, written to ``dest``."""
    import yaml

    dest.write_text(yaml.safe_dump(merge_config(shipped_config(name), changes), sort_keys=False))
    return dest


# --- servers -------------------------------------------------------------------------------------------
@dataclass
class Server:
    variant: str
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    url: str = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def plugin(self) -> bool:
        return VARIANTS[self.variant].plugin

    def start(self, model: Path, family: str, prepared: Path, export_dir: Path) -> None:
        spec = FAMILIES[family]
        args = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--port", str(self.port),
                *COMMON_FLAGS, *EXTRA_FLAGS, *spec["flags"], "--max-total-tokens", str(kv_tokens(family)),
                "--mem-fraction-static", MEM_FRACTION, *VARIANTS[self.variant].flags,
                "--export-metrics-to-file", "--export-metrics-to-file-dir", str(export_dir)]
        variant = VARIANTS[self.variant]
        if self.plugin:
            config = plugin_config_name(family)
            if variant.config:  # the shipped YAML with this variant's changes, as an operator would edit it
                config = str(merged_config(config, variant.config, export_dir.parent / f"config-{self.variant}.yaml"))
            args += ["--enable-mm-coalescer", "--mm-coalescer-config", config]
        export_dir.mkdir(parents=True, exist_ok=True)
        log(f"[{self.variant}] {' '.join(args[1:])} {' '.join(f'{k}={v}' for k, v in variant.env.items())}")
        env = {**environment(prepared, self.plugin, variant.patches), **variant.env}
        self.proc = subprocess.Popen(args, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            code, _ = http("GET", f"{self.url}/health", timeout=5)
            if code == 200:
                log(f"[{self.variant}] healthy")
                return
            time.sleep(2)
        raise TimeoutError(f"{self.variant}: not healthy after {timeout:.0f} s")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.variant} server exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=25)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        except ProcessLookupError:  # the group is already gone
            self.proc.wait()

    def metrics(self) -> str:
        return http("GET", f"{self.url}/metrics", timeout=10)[1]


class MetricsScraper(threading.Thread):
    """Scrapes a server's /metrics every second while a run lasts; keeps the first and last text."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server, self.stop_event, self.samples = server, threading.Event(), []

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append((time.time(), self.server.metrics()))
            self.stop_event.wait(1.0)

    def finish(self) -> tuple[str, str]:
        self.stop_event.set()
        self.join()
        self.samples.append((time.time(), self.server.metrics()))
        return self.samples[0][1], self.samples[-1][1]


# --- load -----------------------------------------------------------------------------------------------
class LoadGenerator:
    """SGLang's ``sglang.benchmark.serving`` in one long-lived process (``loadgen.py``): no per-run start-up."""

    def __init__(self, threads: int | None = None) -> None:
        env = environment(PREPARED, False)
        env["PYTHONPATH"] = f"{HERE / 'stubs'}:{env['PYTHONPATH']}"  # HF datasets stand-in (synthetic sets only)
        if threads:  # dataset builders: a few cores each, leaving the rest to the servers starting meanwhile
            env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        self.proc = subprocess.Popen([sys.executable, str(HERE / "loadgen.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._expect("LOADGEN-READY")

    def _expect(self, prefix: str) -> str:
        line = self.proc.stdout.readline()
        if not line.startswith(prefix):
            raise RuntimeError(f"load generator said {line!r} (exit {self.proc.poll()})")
        return line

    def run(self, argv: list[str], log_path: Path) -> int:
        return self.request(argv=argv, log=str(log_path))

    def request(self, **request: object) -> int:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return int(self._expect("LOADGEN-DONE").split()[1])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def prime(self, model: Path, workload: list[str], log_path: Path) -> None:
        """Build and memoize a dataset (its requests go to a closed port and fail at once, so the exit code is
        always an error and not read)."""
        self.run([*loadgen_argv("http://127.0.0.1:9", model, workload, Path("/dev/null")),
                  "--ready-check-timeout-sec", "0"], log_path)


def loadgen_argv(url: str, model: Path, workload: list[str], output: Path) -> list[str]:
    """SGLang's load generator's arguments for ``workload`` against ``url``: the same for a prime and a measured run
    but for flags ``loadgen.dataset_key`` ignores, so the run finds the primed requests."""
    return ["--backend", "sglang-oai-chat", "--base-url", url, "--model", str(model), "--tokenizer", str(model),
            *workload, "--output-file", str(output), "--disable-tqdm"]


def poisson_seconds() -> float:
    """``GPU_SERVE_POISSON_S``: seconds of arrivals a load (12 unless set)."""
    return float(os.environ.get("GPU_SERVE_POISSON_S", "12"))


def poisson_requests(rate: float) -> int:
    """Requests of a Poisson run at ``rate`` req/s: ``GPU_SERVE_POISSON_S`` of arrivals, 30 to POISSON_MAX."""
    return int(min(POISSON_MAX, max(30, rate * poisson_seconds())))


def poisson_workload(j: int, n: int, rate: float | None = None) -> list[str]:
    """The j-th load's ``n`` Poisson requests (its own seed), paced at ``rate`` req/s where given: a pool and the
    runs that take its first n share the seed, so the load generator finds the pool (``loadgen.dataset_key``)."""
    return [*POISSON_WORKLOAD, "--num-prompts", str(n), *(["--request-rate", f"{rate:.3f}"] if rate else []),
            "--seed", str(400 + j)]


def pool_workload(load: float, j: int, capacity: float | None) -> list[str]:
    """The Poisson pool of the j-th load, built while the servers start: as many requests as a run at ``load`` of
    ``capacity`` takes (the given one, else POOL_CAPACITY_REQ_S), so no run rebuilds it (:func:`prime_pool` says
    why that matters)."""
    return poisson_workload(j, poisson_requests(load * (capacity or POOL_CAPACITY_REQ_S)))


def prime_pool(model: Path, workload: list[str], out: Path, tag: str) -> None:
    """Build a Poisson run's requests before the first server's run (``LOADGEN`` memoizes them; a pool already large
    enough is not rebuilt). SGLang's load generator seeds numpy, builds the dataset from it, then draws the arrival
    gaps from it: a run that builds its requests gets another schedule than one that reuses them. Before this, a
    pool too small was rebuilt by the first server's run, and at 660b520 that Qwen2.5-VL server got 128 requests over
    21.8 s at 80 % load against plugin-off's 18.2 (summarize.own_schedule)."""
    t = time.monotonic()
    LOADGEN.prime(model, workload, out / f"prime-{tag}.log")
    log(f"  {tag}: requests ready in {time.monotonic() - t:.0f} s")


def prime_all(model: Path, workloads: list[list[str]], out: Path, workers: int = 4) -> None:
    """Build every dataset of the run in ``workers`` loadgen processes at once, while the servers start, and
    load them into ``LOADGEN``: 10 image datasets took 150 s one after the other (JPEG encoding and a
    processor pass per request), which is longer than the servers take to start."""
    shards = [workloads[i::workers] for i in range(min(workers, len(workloads)))]

    def build(index: int, shard: list[list[str]]) -> None:
        gen = LoadGenerator(threads=2)
        try:
            for k, workload in enumerate(shard):
                t = time.monotonic()
                gen.prime(model, workload, out / f"prime-{index}-{k}.log")
                log(f"  dataset {index}.{k} built in {time.monotonic() - t:.0f} s")
            gen.request(dump=str(out / f"datasets-{index}.pkl"))
        finally:
            gen.close()

    threads = [threading.Thread(target=build, args=(i, shard)) for i, shard in enumerate(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(shards)):
        dump = out / f"datasets-{i}.pkl"
        if dump.exists():  # a worker that failed leaves its datasets to be built on first use
            LOADGEN.request(load=str(dump))
            dump.unlink()


def stopped_sampler(sampler: StackSampler) -> dict:
    """``sampler.stop()``, or why it failed: one failing stop must not leave the other role's py-spy running."""
    try:
        return sampler.stop()
    except Exception as exc:  # any failure is the sampler's, recorded beside the run
        return {"samples": 0, "error": repr(exc)}


def samplers_for(server: Server, out: Path, tag: str) -> dict[str, StackSampler]:
    """Stack samplers for this run, when ``GPU_SERVE_PROFILE`` names its workload (the tag's letters: lone, seed,
    seedwarm, poisson, warm, capacity) and py-spy is installed: ``scheduler`` (the server's scheduler processes) and
    ``tokenizer_manager`` (the launcher process, where SGLang 0.5.16's tokenizer manager runs each request's HF
    processor, its image maths on the GPU: ``base_processor.py`` passes ``device="cuda:<base_gpu_id>"``)."""
    if re.match(r"[a-z]*", tag).group() not in PROFILE or server.proc is None:
        return {}
    if not PY_SPY.exists():
        log(f"  {tag}: GPU_SERVE_PROFILE is set but {PY_SPY} is missing (carry a py-spy wheel in .gpu-serve/whl)")
        return {}
    samplers = {"tokenizer_manager": StackSampler(PY_SPY, [server.proc.pid], out / f"stacks-{tag}-tokenizer")}
    pids = descendants_titled(server.proc.pid, SCHEDULER_TITLE)
    if pids:
        samplers["scheduler"] = StackSampler(PY_SPY, pids, out / f"stacks-{tag}")
    else:
        log(f"  {tag}: no '{SCHEDULER_TITLE}' process under the server; its scheduler is not sampled")
    return samplers


def process_cpu_seconds(root: int) -> dict[str, float]:
    """CPU seconds (user + system, all threads) used so far by a server's launcher ``root`` and every process under
    it, by process name (SGLang's titles, cut to 15 characters by the kernel: ``sglang::schedul``). Read from /proc;
    empty where there is none."""
    tick = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = {}
    for pid in descendants(root):
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        used[name] = used.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # from state: utime, stime
    return used


def scheduler_thread_seconds(root: int, proc: Path = Path("/proc")) -> dict[str, dict[str, float]]:
    """Per thread of a server's scheduler processes: seconds on a CPU (``cpu``) and seconds runnable but waiting for
    one (``runq``), from ``/proc/PID/task/TID/schedstat``. The process's main thread (SGLang's scheduler loop) is
    ``<name> (main)``; its other threads are summed by name (Python's thread names do not reach the kernel, so the
    plugin's threads share the process's name).

    Why: a slower eager decode with the same CPU seconds is either a thread waiting for a core (``runq``: another
    process on its core, e.g. an idle server's spinning scheduler) or one asleep (the GIL, the GPU); py-spy's samples
    do not tell the first from the second."""
    seconds: dict[str, dict[str, float]] = {}
    for pid in descendants_titled(root, SCHEDULER_TITLE, proc):
        for task in (proc / str(pid) / "task").glob("[0-9]*"):
            try:
                name = (task / "comm").read_text().strip() + (" (main)" if task.name == str(pid) else "")
                on_cpu_ns, runq_ns = (int(v) for v in (task / "schedstat").read_text().split()[:2])
            except (OSError, ValueError):  # the thread ended while we looked, or no schedstat in this kernel
                continue
            spent = seconds.setdefault(name, {"cpu": 0.0, "runq": 0.0})
            spent["cpu"] += on_cpu_ns / 1e9
            spent["runq"] += runq_ns / 1e9
    return seconds


def thread_seconds_during(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                          least_cpu_s: float = 0.05) -> dict[str, dict[str, float]]:
    """:func:`scheduler_thread_seconds` differenced over a run, threads that ran at least ``least_cpu_s``."""
    during = {}
    for name, now in sorted(after.items()):
        was = before.get(name, {"cpu": 0.0, "runq": 0.0})
        if now["cpu"] - was["cpu"] >= least_cpu_s:
            during[name] = {key: round(now[key] - was[key], 3) for key in ("cpu", "runq")}
    return during


def core_siblings(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> dict[int, frozenset[int]]:
    """Each CPU's hardware-thread siblings (itself included), from the kernel's topology; a CPU whose topology is
    not exposed (some VMs) counts as a core of its own."""
    siblings = {}
    for listing in sys_cpu.glob("cpu[0-9]*/topology/thread_siblings_list"):
        cpus: set[int] = set()
        for part in listing.read_text().strip().split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
        siblings[int(listing.parent.parent.name[3:])] = frozenset(cpus)
    return siblings


def running_cpu(pid: int, proc: Path = Path("/proc")) -> int | None:
    """The CPU that thread ``pid`` runs on (``/proc/PID/task/PID/stat``, field 39) while it is runnable (state R);
    None while it sleeps or once it has ended: a sleeping thread takes nothing from its core's sibling."""
    try:
        text = (proc / str(pid) / "task" / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[36]) if fields[0] == "R" else None


class CorePlacement(threading.Thread):
    """Where the loaded server's scheduler thread runs during a run, and how often it shares a physical core (the
    same CPU or a hardware-thread sibling) with another busy thread: every other server's scheduler thread (SGLang's
    scheduler polls without sleeping, loaded or idle) and the load generator.

    Why: an eager decode is paced by the scheduler thread's launches, and a thread that shares a core with a spinning
    one runs slower without waiting in any queue (its CPU seconds stay the same)."""

    def __init__(self, loaded: str, threads: dict[str, int], every_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.loaded, self.threads, self.every_s = loaded, threads, every_s
        self.stop_event, self.seen = threading.Event(), []

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.seen.append({name: running_cpu(pid) for name, pid in self.threads.items()})
            self.stop_event.wait(self.every_s)

    def finish(self, siblings: dict[int, frozenset[int]] | None = None) -> dict:
        self.stop_event.set()
        self.join()
        return core_sharing(self.seen, self.loaded, core_siblings() if siblings is None else siblings)


def watched_threads(servers: dict[str, Server]) -> dict[str, int]:
    """The busy threads :class:`CorePlacement` follows: each server's (first) scheduler thread and the load
    generator's main thread."""
    threads = {}
    for variant, srv in servers.items():
        pids = descendants_titled(srv.proc.pid, SCHEDULER_TITLE) if srv.proc is not None else []
        if pids:
            threads[f"{variant}:scheduler"] = pids[0]
    if LOADGEN is not None:
        threads["loadgen"] = LOADGEN.proc.pid
    return threads


def core_sharing(seen: list[dict[str, int | None]], loaded: str, siblings: dict[int, frozenset[int]]) -> dict:
    """From :class:`CorePlacement`'s samples: of the samples in which ``loaded``'s thread ran, the share in which
    each other thread ran on the same physical core, and the CPUs it ran on."""
    mine = [sample for sample in seen if sample.get(loaded) is not None]
    shared = {}
    for other in sorted({name for sample in seen for name in sample} - {loaded}):
        hits = sum(1 for s in mine if s.get(other) is not None
                   and s[other] in siblings.get(s[loaded], frozenset({s[loaded]})))
        shared[other] = round(hits / len(mine), 3) if mine else None
    cpus: dict[int, int] = {}
    for sample in mine:
        cpus[sample[loaded]] = cpus.get(sample[loaded], 0) + 1
    return {"samples": len(mine), "threads_per_core": max((len(s) for s in siblings.values()), default=1),
            "shared_core": shared, "cpus": dict(sorted(cpus.items()))}


def cpu_during(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each server's CPU seconds by process between two :func:`process_cpu_seconds` readings of every server: the
    loaded one's, and what the idle ones burn meanwhile (a scheduler that spins when idle)."""
    return {variant: {name: round(used - before.get(variant, {}).get(name, 0.0), 2)
                      for name, used in sorted(now.items()) if used > before.get(variant, {}).get(name, 0.0)}
            for variant, now in after.items()}


def bench(server: Server, model: Path, workload: list[str], extra: list[str], out: Path, tag: str) -> dict:
    """One run of SGLang's load generator against one server; returns its result line (plus our scrape)."""
    result_file = out / f"bench-{tag}.jsonl"
    scraper = MetricsScraper(server)
    scraper.start()
    samplers = samplers_for(server, out, tag)
    argv = loadgen_argv(server.url, model, [*workload, *extra], result_file)
    t, started_at = time.monotonic(), time.time()
    limit, done, stopped = run_timeout(workload), threading.Event(), []
    log_start = server.log_path.stat().st_size if server.log_path.exists() else 0

    def watch() -> None:
        """Stop a server that gives no result within ``limit``, or one of whose processes died during this run
        (found within a few seconds, not after the limit); its requests then fail and the load generator
        returns."""
        deadline = time.monotonic() + limit
        while not done.wait(WATCH_INTERVAL_S):
            died = server_failure(read_from(server.log_path, log_start))
            if died or time.monotonic() > deadline:
                stopped.append(f"process died: {died}" if died else f"no result after {limit:.0f} s")
                server.stop()
                return

    watchdog = threading.Thread(target=watch, daemon=True)
    watchdog.start()
    try:
        for sampler in samplers.values():
            sampler.start()
        rc = LOADGEN.run(argv, out / f"bench-{tag}.log")
    finally:
        done.set()
        watchdog.join()  # a stop already under way finishes before anyone else stops this server
        stacks = {role: stopped_sampler(sampler) for role, sampler in samplers.items()}
    before, after = scraper.finish()
    (out / f"metrics-{tag}.txt").write_text(f"# before\n{before}\n# after\n{after}\n")
    if stopped:
        raise RuntimeError(f"{tag}: {stopped[0]}; server stopped (server-{server.variant}.log)")
    if rc != 0 or not result_file.exists():
        raise RuntimeError(f"{tag}: load generator exit {rc}; see bench-{tag}.log")
    line = json.loads(result_file.read_text().strip().splitlines()[-1])
    keep = {k: line.get(k) for k in (
        "duration", "completed", "request_throughput", "total_throughput", "output_throughput",
        "median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms", "median_itl_ms", "mean_itl_ms", "p99_itl_ms",
        "median_e2e_latency_ms", "request_rate", "max_concurrency")}
    keep["errors"] = sum(1 for e in line.get("errors", []) if e)
    keep["requested"] = int(workload_value(workload, "--num-prompts", "0"))
    failure = shortfall(keep, read_from(server.log_path, log_start))
    if failure:
        keep["failure"] = failure
    keep["window"] = [started_at, time.time()]  # wall clock: selects this run's records in SGLang's export
    records = measured_records(request_records(out / f"requests-{server.variant}", keep["window"]), keep["requested"])
    keep.update(arrival_span(records))
    if tag.startswith("poisson"):  # a paced run: what ended its drain (summarize.last_finisher_signs)
        keep.update(last_finisher(records))
    keep["coalescer"] = coalescer_delta(before, after)
    keep["sglang"] = sglang_delta(before, after)
    trace = gauge_trace(scraper.samples)
    if trace:
        keep["lead_gauges"] = {"columns": ["s", *LEAD_GAUGES], "values": trace}
    if stacks:
        keep["stacks"] = stacks
    log(f"  {tag}: {keep['completed']} done in {keep['duration']:.1f}s, TTFT p50 {keep['median_ttft_ms']:.0f} "
        f"ms p99 {keep['p99_ttft_ms']:.0f}, ITL p99 {keep['p99_itl_ms']:.1f} ms, {keep['total_throughput']:.0f} tok/s"
        f"{arrivals_note(keep)} ({time.monotonic() - t:.0f}s wall)")
    return keep


def arrivals_note(run: dict) -> str:
    """``, arrivals X s, drain Y s`` for a run whose requests SGLang exported: a paced run's pair is compared only
    where both servers got their requests over the same span (summarize.arrivals_apart), which this shows at once.
    The drain's last request follows where it was exported (``exports.last_finisher``): its first token and decode
    tell what made one server's drain, and so its tok/s, differ from the other's."""
    if "arrivals_s" not in run:
        return ""
    last = (f" (last request: first token {run['last_first_token_s']} s, decode {run['last_decode_s']} s)"
            if "last_decode_s" in run else "")
    return f", arrivals {run['arrivals_s']} s, drain {run['drain_s']} s{last}"


def parse_metrics(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


def _delta(before: str, after: str, prefixes: tuple[str, ...]) -> dict[str, float]:
    a, b = parse_metrics(before), parse_metrics(after)
    out: dict[str, float] = {}
    for name, value in b.items():
        base = name.split("{")[0]
        if base.startswith(prefixes) and (base.endswith(("_total", "_sum", "_count"))):
            out[base] = out.get(base, 0.0) + value - a.get(name, 0.0)
    return out


LEAD_GAUGES = ("mm_coalescer_queue_patches", "mm_coalescer_held_bytes", "mm_coalescer_deferred_items")


def gauge_trace(samples: list[tuple[float, str]], names: tuple[str, ...] = LEAD_GAUGES) -> list[list[float]]:
    """The plugin's lead gauges once a second over a run: ``[seconds from the first scrape, *values]`` per scrape
    (each summed over its labels), so a run shows how far the encoder ran ahead of the prefills, and when."""
    if not samples or not any(name in text for name in names for _, text in samples):
        return []
    start = samples[0][0]
    trace = []
    for at, text in samples:
        values = parse_metrics(text)
        trace.append([round(at - start, 2), *(sum(v for key, v in values.items() if key.split("{")[0] == name)
                                              for name in names)])
    return trace


def coalescer_delta(before: str, after: str) -> dict[str, float]:
    """mm_coalescer_* counters over one run: units per forward, early vs on-demand items, prefill waits."""
    d = _delta(before, after, ("mm_coalescer_",))
    if not d:
        return {}
    forwards = d.get("mm_coalescer_forwards_total", 0.0)
    d["units_per_forward"] = d.get("mm_coalescer_units_total", 0.0) / forwards if forwards else 0.0
    return d


def sglang_delta(before: str, after: str) -> dict[str, float]:
    """SGLang's own histograms over one run (sums and counts): queueing, TTFT, e2e, per-stage times."""
    return _delta(before, after, ("sglang:",))


# --- correctness ----------------------------------------------------------------------------------------
def png_b64(size: tuple[int, int], seed: int) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mp4_b64(size: tuple[int, int], frames: int, fps: float, seed: int) -> str:
    """A small MPEG-4 clip of smooth moving gradients (noise would not survive the codec the same way twice)."""
    import tempfile

    import cv2
    import numpy as np

    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/clip.mp4"
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
        for i in range(frames):
            phase = seed + i
            frame = np.stack([(xs * 3 + phase * 7) % 256, (ys * 2 + phase * 11) % 256,
                              ((xs + ys) + phase * 5) % 256], axis=-1).astype(np.uint8)
            writer.write(frame)
        writer.release()
        data = Path(path).read_bytes()
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def greedy_reply(server: Server, model: Path, content: list[dict]) -> str:
    """The server's greedy reply, or why there is none. A server one of whose processes died is not asked: its
    HTTP side would hold each request for the whole timeout (server_failure)."""
    died = server_failure(read_from(server.log_path, 0))
    if died:
        return f"process died: {died}"
    body = {"model": str(model), "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 24}
    code, text = http("POST", f"{server.url}/v1/chat/completions", body, timeout=120)
    if code != 200:
        return f"HTTP {code}: {text[:200]}"
    try:
        return json.loads(text)["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError) as exc:  # one bad reply must not stop the other servers' requests
        return f"unreadable reply ({exc!r}): {text[:200]}"


def _free_encoder(variant: str) -> bool:
    return "free_encoder" in VARIANTS[variant].patches


def encoding_offs(variants: list[str]) -> list[str]:
    """The plugin-off servers that run their vision encoder: what a plugin server is measured and checked against."""
    return [v for v in variants if not VARIANTS[v].plugin and not _free_encoder(v)]


def capacity_baseline(variants: list[str]) -> str:
    """The server whose capacity paces the Poisson loads: plain ``off``, else the first plugin-off server that
    runs its vision encoder (``off+mmsdpa`` in a command of SDPA servers)."""
    offs = encoding_offs(variants)
    return "off" if "off" in offs else offs[0]


def reply_baselines(variants: list[str]) -> dict[str, str]:
    """The plugin-off server whose greedy replies each compared server must repeat: for a plugin server the one
    with its SGLang flags (``on+mmsdpa`` -> ``off+mmsdpa``: another vision attention kernel may change the replies),
    else plain ``off``; for a plugin-off server plain ``off`` (itself when it is that one, or when there is none).
    Free-encoder servers answer from zeros and are not compared."""
    offs = encoding_offs(variants)
    baselines = {}
    for v in variants:
        if _free_encoder(v):
            continue
        twin = next((o for o in offs if VARIANTS[o].flags == VARIANTS[v].flags), None) if VARIANTS[v].plugin else None
        baseline = twin or ("off" if "off" in offs else None)
        if baseline is not None or not VARIANTS[v].plugin:
            baselines[v] = baseline or v
    return baselines


def correctness(servers: dict[str, Server], model: Path, n: int, video: bool) -> dict:
    """Greedy replies to the same requests from every compared server vs its plugin-off baseline
    (:func:`reply_baselines`): ``n`` image requests (1-3 images of mixed sizes) and, for families that take video,
    one request with a 4 s clip plus an image."""
    baselines = reply_baselines(list(servers))
    servers = {v: server for v, server in servers.items() if v in baselines}
    sizes = [(480, 480), (640, 360), (256, 256), (1024, 768), (333, 517)]
    requests = []
    for i in range(n):
        content = [{"type": "image_url", "image_url": {"url": png_b64(sizes[(i + k) % len(sizes)], 1000 * i + k)}}
                   for k in range(1 + i % 3)]
        requests.append(("image", [*content, {"type": "text", "text": f"Describe picture set {i}."}]))
    if video:
        clip = {"type": "video_url", "video_url": {"url": mp4_b64((320, 240), 16, 4.0, 3)}}
        picture = {"type": "image_url", "image_url": {"url": png_b64((480, 480), 77)}}
        requests.append(("video", [clip, picture, {"type": "text", "text": "What happens in the clip?"}]))
    # The servers answer side by side, each one request at a time as before (so each reply is the same as when
    # asked alone): with four servers the sequential loop took 131 s of a command with a 430 s budget (e5bb1ae).
    with ThreadPoolExecutor(max_workers=len(servers)) as pool:
        answers = dict(zip(servers, pool.map(
            lambda server: [greedy_reply(server, model, content) for _, content in requests], servers.values()),
            strict=True))
    results = []
    for i, (kind, content) in enumerate(requests):
        replies = {v: answers[v][i] for v in servers}
        ok = all(replies[v] == replies[base] and not replies[base].startswith(("HTTP ", "process died"))
                 for v, base in baselines.items())
        results.append({"kind": kind, "parts": len(content) - 1, "replies": replies, "identical": ok})
    images = [r for r in results if r["kind"] == "image"]
    videos = [r for r in results if r["kind"] == "video"]
    identical = sum(r["identical"] for r in images)
    log(f"  correctness: {identical}/{len(images)} image requests"
        + (f" and {sum(r['identical'] for r in videos)}/{len(videos)} video requests" if videos else "")
        + f" got the same greedy reply from {', '.join(servers)}")
    return {"requests": len(images), "identical": identical, "video_requests": len(videos),
            "video_identical": sum(r["identical"] for r in videos),
            "all_identical": all(r["identical"] for r in results), "servers": list(servers),
            "baselines": baselines, "replies": results}


# --- workloads ------------------------------------------------------------------------------------------
def pairs(names: list[str], i: int) -> list[str]:
    """Run order for repetition ``i``: alternate the order so neither side always goes first."""
    return names if i % 2 == 0 else names[::-1]


def given_capacity() -> float | None:
    """``GPU_SERVE_CAPACITY``: plugin-off's capacity in req/s from an earlier run (its ``capacity_req_s``), which
    spares this run the capacity run; None when unset. Checked before anything starts (``main``): a bad value found
    only when Poisson begins would waste the command."""
    text = os.environ.get("GPU_SERVE_CAPACITY", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"GPU_SERVE_CAPACITY={text!r}: give plugin-off's capacity in requests a second, > 0")
    return value


def results_header(family: str, variants: list[str]) -> dict:
    """What results.json says of a run before its first measurement: each server's SGLang flags, what it changes
    beyond plugin on or off, the config each plugin server ran (``configs``: summarize.shipped_server compares it
    with the family's config of the day), a KV pool cut by GPU_SERVE_MAX_TOTAL_TOKENS, and ``poisson_primed``: each
    Poisson load's requests are built before its first run (:func:`prime_pool`), so every server of a load gets the
    same arrival schedule (summarize.own_schedule reads the runs before this)."""
    result: dict = {"family": family, "variants": {v: list(VARIANTS[v].flags) for v in variants},
                    "variant_changes": {v: {"config": VARIANTS[v].config, "env": VARIANTS[v].env,
                                            **({"sglang_backports": True} if "feature_device" in VARIANTS[v].patches
                                               else {}),
                                            **({"free_encoder": True} if _free_encoder(v) else {})}
                                        for v in variants},
                    "configs": {v: merge_config(shipped_config(plugin_config_name(family)), VARIANTS[v].config)
                                for v in variants if VARIANTS[v].plugin},
                    "poisson_primed": True, "runs": {}, "failed_to_start": {}, "failed_runs": {}}
    if kv_tokens(family) != FAMILIES[family]["max_total_tokens"]:  # in every results.json written, a cut-off one's too
        result["max_total_tokens"] = kv_tokens(family)
    return result


def run_family(family: str, model: Path, workloads: list[str], variants: list[str], runs: range, out: Path,
               deadline: float, publish: Path) -> dict:
    servers = {v: Server(v, 30000 + k, out / f"server-{v}.log") for k, v in enumerate(variants)}
    result = results_header(family, variants)

    def remaining() -> float:
        return deadline - time.monotonic()

    def measured(tag: str, server: Server, workload: list[str]) -> None:
        """One run; results are written after each (a cut-off run keeps them). Every server's CPU seconds by
        process during the run go beside its result (``cpu_s``). A run with failed requests is a failed run
        (``failed_runs``; its numbers under ``incomplete_runs``), so no ratio is taken from it."""
        def cpu_now() -> dict[str, dict[str, float]]:
            return {v: process_cpu_seconds(srv.proc.pid) for v, srv in servers.items() if srv.proc is not None}

        def threads_now() -> dict[str, dict[str, float]]:
            return scheduler_thread_seconds(server.proc.pid) if server.proc is not None else {}

        try:
            cpu_before, threads_before = cpu_now(), threads_now()
            placement = CorePlacement(f"{server.variant}:scheduler", watched_threads(servers))
            placement.start()
            try:
                run = bench(server, model, workload, [], out, tag)
            finally:
                sharing = placement.finish()
            run["cpu_s"] = cpu_during(cpu_before, cpu_now())
            run["scheduler_threads_s"] = thread_seconds_during(threads_before, threads_now())
            run["core_sharing"] = sharing
            if "failure" in run:  # kept for reading, never compared: the server keeps serving the next runs
                result["failed_runs"][tag] = run["failure"]
                result.setdefault("incomplete_runs", {})[tag] = run
                log(f"[{server.variant}] {tag}: {run['failure']}")
            else:
                result["runs"][tag] = run
            busiest = sorted(run["scheduler_threads_s"].items(), key=lambda kv: -kv[1]["cpu"])[:3]
            log(f"  {tag}: scheduler threads (CPU / run-queue s): "
                + ", ".join(f"{name} {spent['cpu']:.2f} / {spent['runq']:.2f}" for name, spent in busiest)
                + f"; its core shared with: {sharing['shared_core']} ({sharing['samples']} samples, "
                f"{sharing['threads_per_core']} threads a core)")
        except RuntimeError as exc:  # an extra variant that fails is dropped; off and on must work
            if server.variant in ("off", "on"):
                raise
            result["failed_runs"][tag] = str(exc)
            log(f"[{server.variant}] {exc}; dropping this variant")
            servers.pop(server.variant).stop()
        (publish / f"results-{family}.json").write_text(json.dumps(result, indent=1))

    loads = [float(x) for x in os.environ.get("GPU_SERVE_LOADS", "0.5,0.8,0.25,1.0").split(",")]
    warm = [*SEED_WORKLOAD, "--num-prompts", "16", "--request-rate", "inf", "--seed", "1"]
    seed_warm = [*SEED_WORKLOAD, "--num-prompts", "16", "--request-rate", "inf", "--seed", "500"]
    lone = [*SEED_WORKLOAD, "--num-prompts", "8", "--max-concurrency", "1", "--request-rate", "inf", "--seed", "7"]
    seeds = [[*SEED_WORKLOAD, "--num-prompts", "100", "--request-rate", "inf", "--seed", str(100 + i)]
             for i in runs]
    capacity = [*POISSON_WORKLOAD, "--num-prompts", "120", "--request-rate", "inf", "--seed", "300"]
    # Poisson pools, one seed per load: a run takes the first n (n follows the capacity).
    capacity_given = given_capacity()
    pools = [pool_workload(load, j, capacity_given) for j, load in enumerate(loads)]
    try:
        for v, server in servers.items():
            server.start(model, family, PREPARED, out / f"requests-{v}")
        datasets = [warm, lone, seed_warm, *seeds] if {"lone", "seed"} & set(workloads) else [warm]
        if "poisson" in workloads:
            datasets += [*([] if capacity_given else [capacity]), *pools]
        prime_all(model, datasets, out)
        log(f"{len(datasets)} datasets ready")
        for v, server in list(servers.items()):
            try:
                server.wait_healthy(360)
            except (RuntimeError, TimeoutError) as exc:
                if v in ("off", "on"):
                    raise
                result["failed_to_start"][v] = str(exc)[-2000:]
                log(f"[{v}] did not start; continuing without it")
                server.stop()
                del servers[v]
        for v, server in list(servers.items()):  # JIT kernels build here (nvcc), not in a measured run
            measured(f"warm-{v}", server, warm)
        if "correct" in workloads:
            result["correctness"] = correctness(servers, model, int(os.environ.get("GPU_SERVE_CORRECT_N", "20")),
                                                video=FAMILIES[family].get("video", False))
            (publish / f"results-{family}.json").write_text(json.dumps(result, indent=1))
        if "lone" in workloads:
            # In the order of the first repetition (--first-run's parity): at 1a3705d the server measured second
            # decoded more slowly in all five lone runs, by 20 % between two identical plugin-off servers.
            for v in pairs(list(servers), runs.start):
                measured(f"lone-{v}", servers[v], lone)
        if "seed" in workloads:
            # First guess from the warm-up bursts (16 requests; a repetition is a 16-request warm-up plus 100
            # requests per server); then what the last repetition took (Gemma3: ~2.5 minutes).
            warm_runs = {**result["runs"], **result.get("incomplete_runs", {})}
            rep_s = sum(warm_runs.get(f"warm-{v}", {}).get("duration", 4.0) * (1 + 100 / 16) for v in servers)
            for n, i in enumerate(runs):
                if remaining() < rep_s:
                    log(f"seed: deadline near ({remaining():.0f} s left, a repetition ~{rep_s:.0f} s), "
                        f"stopping after {n} repetitions")
                    break
                started = time.monotonic()
                for v in pairs(list(servers), i):
                    if v in servers:
                        measured(f"seedwarm{i}-{v}", servers[v], seed_warm)
                    if v in servers:
                        measured(f"seed{i}-{v}", servers[v], seeds[n])
                rep_s = time.monotonic() - started
        if "poisson" in workloads and remaining() <= 40:
            log(f"poisson: deadline near ({remaining():.0f} s left), skipping every load")
        elif "poisson" in workloads:
            if capacity_given:  # a Gemma3-12B capacity run alone takes ~70 s of a command's budget
                result["capacity_req_s"], result["capacity_source"] = capacity_given, "GPU_SERVE_CAPACITY"
            elif remaining() < CAPACITY_RUN_S:
                log(f"poisson: deadline near ({remaining():.0f} s left), no time for the capacity run; skipping every "
                    "load (GPU_SERVE_CAPACITY skips that run)")
                return result
            else:
                base = capacity_baseline(list(servers))
                cap = bench(servers[base], model, capacity, [], out, f"capacity-{base}")
                if "failure" in cap:  # a rate from the requests that completed would pace every load wrongly
                    result["failed_runs"][f"capacity-{base}"] = cap["failure"]
                    log(f"poisson: the capacity run failed ({cap['failure']}); skipping every load")
                    return result
                result["capacity_req_s"], result["capacity_source"] = cap["request_throughput"], f"capacity-{base}"
            for j, load in enumerate(loads):  # the issue's must-haves (50 %, 80 %) first
                rate = load * result["capacity_req_s"]
                n = poisson_requests(rate)
                if remaining() < len(servers) * (n / rate + POISSON_DRAIN_S):
                    log(f"poisson: deadline near ({remaining():.0f} s left), skipping load {load}")
                    continue
                w = poisson_workload(j, n, rate)
                prime_pool(model, w, out, f"poisson{load}")
                for v in pairs(list(servers), j):
                    if v in servers:
                        measured(f"poisson{load}-{v}", servers[v], w)
    finally:
        for s in servers.values():
            s.stop()
    return result


def main() -> None:
    global PREPARED, LOADGEN, LOG_COPY
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="qwen2_5_vl_7b", choices=sorted(FAMILIES))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-serve-out")),
                   help="gets results-<family>.json and gpu-serve-<family>.tar.xz (every raw file)")
    p.add_argument("--prepared", type=Path, default=REPO / ".gpu-serve")
    p.add_argument("--workloads", default="correct,lone,seed,poisson")
    p.add_argument("--runs", type=int, default=3, help="seed-workload repetitions")
    p.add_argument("--first-run", type=int, default=0,
                   help="index of the first repetition (its --seed and tag): a later command adds new requests")
    p.add_argument("--variants", default="off,on", help=f"servers to compare, from {', '.join(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=560.0,
                   help="the command's whole wall time, teardown included: a seed repetition, the capacity run and a "
                        "Poisson load start only when their estimates end in time (warm-up, correctness and lone "
                        "runs are short and always run); keep it under the device's per-command limit")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        p.error(f"unknown --variants {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    try:  # checked before anything starts: a bad value found when the first server starts wastes the command
        kv_tokens(args.family)
    except ValueError as exc:
        p.error(str(exc))
    too_big = exceeds_the_gpu(args.family, variants)
    if too_big:
        p.error(too_big)
    workloads = args.workloads.split(",")
    if {"correct", "poisson"} & set(workloads) and not encoding_offs(variants):
        p.error("correct and poisson need a plugin-off server that runs its encoder (off, or off+<flags>)")
    try:
        given_capacity()
    except ValueError as exc:
        p.error(str(exc))
    PREPARED = args.prepared.resolve()
    deadline = command_deadline(T0, args.budget_s, len(variants))
    out = Path("/tmp/gpu-serve-out") / args.family
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    LOG_COPY = args.out / "serve.log"
    install(PREPARED)
    jit = PREPARED / "jitcache.tar.xz"  # nvcc-built kernels of earlier runs (xz: 15 MB of .so files in ~1 MB)
    if jit.exists():
        Path("/tmp/jitcache").mkdir(exist_ok=True)
        subprocess.run(["tar", "-xf", str(jit), "-C", "/tmp/jitcache"], check=False)
    model = Path(f"/tmp/gpu-serve-model-{args.family}")
    if not (model / "config.json").exists():
        builder = os.environ.get("GPU_SERVE_BUILDER", str(HERE / "build_model.py"))
        subprocess.run([sys.executable, builder, str(model), "--family", args.family],
                       check=True, env=environment(PREPARED, False))
    log(f"model {model} ready; GPU: " + subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True, text=True).stdout.strip())
    archive = ["tar", "-cJf", str(args.out / f"gpu-serve-{args.family}.tar.xz"), "-C", str(out.parent), out.name]
    LOADGEN = LoadGenerator()
    try:
        result = run_family(args.family, model, workloads, variants,
                            range(args.first_run, args.first_run + args.runs),
                            out, deadline, args.out)
    except BaseException:
        subprocess.run(archive, check=False)  # the raw files of a run that failed
        raise
    finally:
        LOADGEN.close()
    result["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                   capture_output=True, text=True).stdout.strip()
    result["commit"] = os.environ.get("GPU_SERVE_COMMIT", "")
    result["extra_flags"] = EXTRA_FLAGS
    result["sglang"] = subprocess.run([sys.executable, "-c", "import sglang; print(sglang.__version__)"],
                                      capture_output=True, text=True, env=environment(PREPARED, False)).stdout.strip()
    (out / "results.json").write_text(json.dumps(result, indent=1))
    shutil.copy(out / "results.json", args.out / f"results-{args.family}.json")  # final, with gpu/commit/sglang
    subprocess.run(archive, check=True)  # once, with results.json: xz takes seconds of device time
    built = sorted(str(f.relative_to("/tmp/jitcache")) for f in Path("/tmp/jitcache").rglob("*.so"))
    carried = subprocess.run(["tar", "-tf", str(jit)], capture_output=True, text=True).stdout if jit.exists() else ""
    if set(built) - {line.removeprefix("./") for line in carried.split()}:  # carry it next time: no nvcc in runs
        subprocess.run(f"cd /tmp/jitcache && find . -name '*.so' | tar -cJf {args.out}/jitcache.tar.xz -T -",
                       shell=True, check=False)
    log(f"done: {args.out}/results-{args.family}.json")


PREPARED = REPO / ".gpu-serve"
LOADGEN: LoadGenerator | None = None  # set by main()

if __name__ == "__main__":
    main()
