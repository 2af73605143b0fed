"""How the plugin is switched on: two server flags, or environment variables for ``Engine(...)`` users.

``ServerArgs`` is a sealed msgspec struct, so the choice travels as an underscore attribute
(:data:`ATTR`), which the struct allows and which ``ServerArgs.__reduce__`` pickles into the spawned
scheduler processes. The attribute holds plain data (the YAML values and their file), never our
classes, so anything that unpickles ``ServerArgs`` can do so without this package.

The config file is validated in the launching process so a bad path, bad YAML or unknown key stops
start-up with a message naming the file and the key. That check does not import prometheus_client
(``mm_scheduler.metrics`` defers it to first use): SGLang sets ``PROMETHEUS_MULTIPROC_DIR`` only later,
and prometheus_client fixes its storage mode when first imported.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mm_scheduler.tune import Change, Observed

ATTR = "_mm_coalescer"
ENV_ENABLE = "MM_COALESCER"
ENV_CONFIG = "MM_COALESCER_CONFIG"
ENV_MODE = "MM_COALESCER_MODE"
ENV_MAX_HELD_MB = "MM_COALESCER_MAX_HELD_MB"
DEFAULT_MAX_HELD_MB = 1024.0
MODES = ("auto", "async", "lockstep")
PLUGIN_DEFAULTS: dict[str, Any] = {
    # CUDA priority of SGLang's own streams (created while the scheduler starts). Priority 0, which
    # SGLang uses, is already CUDA's lowest, and so is the encoder's stream: "high" creates the
    # LLM's streams at the highest priority so decode kernels overtake encoder kernels.
    "llm_stream_priority": "high",
    # Longest a prefill waits for a result encoded since arrival (its units jump the queue first);
    # past it the whole call falls back to the model's own method.
    "prefill_wait_ms": 2000.0,
    # Off (0) by default. > 0: a waiting request whose early encode is not done is left out of prefill
    # batches, for at most this many ms: other work runs meanwhile, or with none the scheduler waits for the
    # encodes outside the prefill and goes on taking requests in (a prefill blocked on an encode takes none).
    "defer_prefill_ms": 0.0,
    # 0 (default): every request's media is encoded when it arrives. N > 0: only when at least N requests
    # already wait for a prefill ahead of it. With fewer, its prefill usually comes next: an encode at arrival
    # has little head start to give, and its forward would run beside the scheduler's own kernel launches;
    # such a request is encoded by its prefill, or as soon as a prefill batch passes it over.
    "early_encode_min_waiting": 0,
    # CUDA graphs of the vision forward, captured at start-up and replayed on the encoder's stream. Qwen towers:
    # one per bucket of patches (a batch is padded to the smallest bucket that holds it; a larger one is cut into
    # runs). Gemma3 and Gemma 4: one per batch size of images a bucket holds. Empty (default): no graphs. Needs
    # --mm-attention-backend triton_attn (Gemma3 also sdpa).
    "vit_graph_patches": [],
    # True: the tokenizer manager's multimodal preprocessing, and SGLang's hand-over of the features to /dev/shm,
    # run on a thread with an event loop of its own (integration/preprocess.py), so a burst's preprocessing no longer
    # holds back replies and intake. Seed bursts in the real server (e214c80, one run each): TTFT median 0.66x /
    # 0.77x of plugin-on (Qwen3-VL / Gemma 4). Off (default) until measured under Poisson load and on every family;
    # nothing changes where SGLang already runs its processor off the loop.
    "preprocess_thread": False,
    # True (default): where a start-up probe shows it lossless, image pixels cross from the tokenizer manager to the
    # scheduler as uint8, a quarter of the float32 bytes, and the scheduler redoes the processor's rescale and
    # normalize bit for bit where they are used (integration/pixel_transport.py). Gemma 4 seed burst in the real
    # server: median TTFT 0.71x of the plugin without it, same run (README, levers); elsewhere a start-up line says
    # why not.
    "uint8_pixels": True,
    # True (default): with a transformers older than 5.17 (SGLang 0.5.16-0.5.21 pin 5.12.1), the tokenizer manager's
    # HF processors count their image tokens as transformers 5.17 does, on lists instead of one tensor element at a
    # time: the same counts, 8-13 ms less a six-image request on its main thread (integration/token_check.py).
    "fast_mm_token_check": True,
    # N >= 1: the tokenizer manager's process runs torch's CPU operators on N threads, as SGLang's own tokenizer
    # workers do (0.5.16 TokenizerWorker: torch.set_num_threads(1)); null (default): torch's default, one a core.
    # On the real server the single tokenizer manager burned 0.85-0.9 CPU-s a six-image request against ~80 ms of
    # wall time (Qwen2.5-VL-7B, 660b520, H100: ~8 of the machine's 16 vCPUs during a burst). With 1 (e534b6b,
    # beside the plugin without it): that process 87 -> 4 CPU-s a burst, seed TTFT median 0.64-0.67x, lone 0.78x.
    # Beside plugin-off, qwen2_5_vl (e84345c, a22131f), gemma4 and gemma3 (a22131f) set 1. Off by default: on
    # Qwen3-VL (fabe2d2) it won a burst but lost at 80 % Poisson load (ITL p99 1.09x / 1.38x of plugin-off).
    "tokenizer_torch_threads": None,
}
MAX_GRAPH_BUCKETS = 8
_TRUE = {"1", "true", "yes", "on"}

# The smallest unit a model of each supported family sends to its tower, in patches, and the tower's
# activation bytes per patch as its adapter declares them (integration/adapters.py, bf16). A config
# whose ``name`` is a family (as the shipped ones are) must have a budget that holds one such unit,
# or every forward would be refused. Qwen: one 2x2 merge window (smart_resize's floor); Gemma 3:
# one 896 px crop of 14 px patches; Gemma 4: the smallest soft-token budget (70) times 3x3 pooling.
FAMILY_SMALLEST_UNIT: dict[str, tuple[str, int, int]] = {
    "qwen2_5_vl": ("2x2-patch image", 4, (5 * 1280 + 3 * 3420) * 2),
    "qwen3_vl": ("2x2-patch image", 4, (5 * 1152 + 2 * 4304) * 2),
    "gemma3": ("896 px crop", 64 * 64, (5 * 1152 + 2 * 4304) * 2),
    "gemma4": ("70-token image", 70 * 9, (5 * 768 + 3 * 3072) * 2),
}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the plugin's flags to SGLang's own parser (so ``--help`` and ``--config`` files know them)."""
    group = parser.add_argument_group("mm-scheduler (vision-encoder coalescing plugin)")
    group.add_argument("--enable-mm-coalescer", action="store_true", default=False,
                       help="Batch vision-encoder work of concurrent requests under a memory budget and "
                            f"start encoding when a request arrives. Also enabled by {ENV_ENABLE}=1.")
    group.add_argument("--mm-coalescer-config", type=str, default=None, metavar="NAME|PATH",
                       help="Coalescer settings: a shipped config by name (default, qwen2_5_vl, qwen3_vl, gemma3, "
                            "gemma4) or a YAML file; implies --enable-mm-coalescer. Also read from "
                            f"{ENV_CONFIG}. Check one with: mm-scheduler check-config NAME|PATH.")
    group.add_argument("--mm-coalescer-max-held-mb", type=float, default=None, metavar="MB",
                       help="Most memory that results encoded ahead of their prefill may hold; requests "
                            "arriving beyond it are encoded when their prefill runs. Default "
                            f"{DEFAULT_MAX_HELD_MB:g}; also read from {ENV_MAX_HELD_MB}.")


def resolve(enable: bool, config_path: str | None, max_held_mb: float | None = None) -> dict[str, Any] | None:
    """The settings to store on ServerArgs, or None when disabled; environment fills what flags omit.

    ``config_path`` is a YAML file or a shipped config's name. Raises ValueError naming the file and
    key when the config cannot be used. ``mm-scheduler check-config`` calls exactly this.
    """
    config_path = config_path or os.environ.get(ENV_CONFIG) or None
    enabled = enable or config_path is not None or os.environ.get(ENV_ENABLE, "").strip().lower() in _TRUE
    if not enabled:
        return None
    mode = os.environ.get(ENV_MODE, "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={mode!r}: expected one of {list(MODES)}")
    if max_held_mb is None:
        raw = os.environ.get(ENV_MAX_HELD_MB)
        try:
            max_held_mb = DEFAULT_MAX_HELD_MB if raw is None else float(raw)
        except ValueError:
            raise ValueError(f"{ENV_MAX_HELD_MB}={raw!r}: expected a number of megabytes") from None
    if not math.isfinite(max_held_mb) or max_held_mb < 0:
        raise ValueError(f"max held results must be a finite number >= 0 MB, got {max_held_mb!r}")
    values: dict[str, Any] = {}
    plugin = dict(PLUGIN_DEFAULTS)
    if config_path is not None:
        checked = check_config_file(config_path)
        config_path, values, plugin = checked["config_path"], checked["values"], checked["plugin"]
    return {"config_path": config_path, "values": values, "mode": mode, "max_held_bytes": int(max_held_mb * 2**20),
            "plugin": plugin}


def check_config_file(name_or_path: str) -> dict[str, Any]:
    """Validate one config file (or shipped name) as the server does: the core keys, the ``sglang:`` section
    and the budget against the model family's smallest unit. Returns the resolved file and effective values."""
    from mm_scheduler.config import CoalescerConfig, config_from_dict, read_config_file

    path, raw = read_config_file(name_or_path)
    core = {key: value for key, value in raw.items() if key != "sglang"}
    loaded = config_from_dict(core, source=str(path))
    _check_budget_holds_smallest_unit(loaded, str(path))
    values = {key: getattr(loaded, key) for key in CoalescerConfig.__dataclass_fields__}
    return {"config_path": str(path), "values": values, "plugin": _plugin_section(raw.get("sglang"), str(path))}


def _check_budget_holds_smallest_unit(config: Any, source: str) -> None:
    family = FAMILY_SMALLEST_UNIT.get(config.name)
    if family is None or config.budget_bytes is None:  # a fraction's bytes depend on the GPU: checked at start
        return
    what, patches, declared = family
    per_patch = config.bytes_per_patch if isinstance(config.bytes_per_patch, int) else declared
    if config.budget_bytes < patches * per_patch:
        raise ValueError(f"{source}: 'budget_bytes' {config.budget_bytes} cannot hold the smallest {config.name} "
                         f"unit (one {what}: {patches} patches x {per_patch} bytes/patch = {patches * per_patch} "
                         f"bytes); raise budget_bytes")


def _plugin_section(section: Any, config_path: str) -> dict[str, Any]:
    """The YAML file's ``sglang:`` section (settings of this plugin, not of the core), validated."""
    section = section or {}
    if not isinstance(section, dict):
        raise ValueError(f"{config_path}: 'sglang' must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(PLUGIN_DEFAULTS))
    if unknown:
        from mm_scheduler.config import did_you_mean

        hint = did_you_mean(unknown, PLUGIN_DEFAULTS)
        raise ValueError(f"{config_path}: unknown key(s) {unknown} under 'sglang'{hint}; "
                         f"known: {sorted(PLUGIN_DEFAULTS)}")
    priority = section.get("llm_stream_priority", PLUGIN_DEFAULTS["llm_stream_priority"])
    if priority not in ("high", "default"):
        raise ValueError(f"{config_path}: sglang.llm_stream_priority must be 'high' or 'default', got {priority!r}")
    wait = section.get("prefill_wait_ms", PLUGIN_DEFAULTS["prefill_wait_ms"])
    if not _is_finite_number(wait) or wait <= 0:
        raise ValueError(f"{config_path}: sglang.prefill_wait_ms must be a finite number > 0, got {wait!r}")
    defer = section.get("defer_prefill_ms", PLUGIN_DEFAULTS["defer_prefill_ms"])
    if not _is_finite_number(defer) or defer < 0:
        raise ValueError(f"{config_path}: sglang.defer_prefill_ms must be a finite number >= 0, got {defer!r}")
    min_waiting = section.get("early_encode_min_waiting", PLUGIN_DEFAULTS["early_encode_min_waiting"])
    if not isinstance(min_waiting, int) or isinstance(min_waiting, bool) or min_waiting < 0:
        raise ValueError(f"{config_path}: sglang.early_encode_min_waiting must be a whole number >= 0, "
                         f"got {min_waiting!r}")
    buckets = section.get("vit_graph_patches", PLUGIN_DEFAULTS["vit_graph_patches"])
    if not isinstance(buckets, list) or len(buckets) > MAX_GRAPH_BUCKETS or any(
            not isinstance(b, int) or isinstance(b, bool) or b <= 0 or b % 4 for b in buckets):
        raise ValueError(f"{config_path}: sglang.vit_graph_patches must be a list of at most {MAX_GRAPH_BUCKETS} "
                         f"patch counts, each a positive multiple of 4 (one 2x2 merge window), got {buckets!r}")
    threads = section.get("tokenizer_torch_threads", PLUGIN_DEFAULTS["tokenizer_torch_threads"])
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ValueError(f"{config_path}: sglang.tokenizer_torch_threads must be a whole number >= 1, or null for "
                         f"torch's default, got {threads!r}")
    return {"llm_stream_priority": priority, "prefill_wait_ms": float(wait), "defer_prefill_ms": float(defer),
            "early_encode_min_waiting": min_waiting, "vit_graph_patches": sorted(set(buckets)),
            "tokenizer_torch_threads": threads,
            **{name: _switch(section, name, config_path) for name in _SWITCHES}}


_SWITCHES = ("preprocess_thread", "uint8_pixels", "fast_mm_token_check")


def _switch(section: Any, name: str, config_path: str) -> bool:
    """A true/false setting under ``sglang:``, its default when absent."""
    value = section.get(name, PLUGIN_DEFAULTS[name])
    if not isinstance(value, bool):
        raise ValueError(f"{config_path}: sglang.{name} must be true or false, got {value!r}")
    return value


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def preprocessing_advice(server_args: object) -> str | None:
    """One start-up line when SGLang's own preprocessing flags are off, or when they make ``preprocess_thread``
    inapplicable (None otherwise).

    In a real SGLang server (README, "Serving in a real SGLang server") the single tokenizer manager's
    image preprocessing and the CPU hand-over of float32 patches, not the vision tower, dominated TTFT
    on image-heavy traffic; SGLang's flags cut it where this plugin could not. On top of them the plugin lost on
    the Qwen families and won on Gemma 4, so the line asks for a measurement, not for the plugin off."""
    workers = getattr(server_args, "tokenizer_worker_num", None)
    transport = getattr(server_args, "mm_feature_transport", None) or "cpu"
    plugin = (settings_of(server_args) or {}).get("plugin", {})
    # uint8_pixels has no effect there either, but it is on by default and applies only where it can, so the line
    # does not name it for every server with tokenizer workers (README, configuration).
    if plugin.get("preprocess_thread") and workers is not None and workers > 1:
        return (f"mm-coalescer: with --tokenizer-worker-num {workers}, no effect of sglang.preprocess_thread: "
                "SGLang's tokenizer workers run in processes that load no plugins (0.5.16 init_multi_tokenizer)")
    if workers is None or (workers > 1 and transport == "cuda_ipc"):
        return None
    return (f"mm-coalescer: SGLang runs {workers} tokenizer worker(s) with {transport} feature transport; on "
            "image-heavy traffic its preprocessing, not the vision tower, dominated TTFT in our real-server runs "
            "(--tokenizer-worker-num 4 --mm-feature-transport cuda_ipc without this plugin: TTFT 0.66x on Qwen2.5-VL, "
            "0.57x on Qwen3-VL, whose 0.5.16 needs 0.5.23's device fix or this plugin for them, 0.94x on Gemma 4); "
            "turn those on first, then measure this plugin against them (on top of them it lost on Qwen2.5-VL and "
            "Qwen3-VL, 1.20x and 1.11x, and won on Gemma 4, 0.70x)")


def tune_rules(values: dict[str, Any], seen: Observed) -> list[Change]:
    """The ``sglang:`` keys a scrape justifies changing (``mm-scheduler tune``)."""
    plugin = {**PLUGIN_DEFAULTS, **(values.get("sglang") or {})}  # checked already: tune loads it as the server
    return [*_encode_behind_a_queue(plugin, seen), *_graph_buckets(plugin, seen), *_tokenizer_threads(plugin, seen)]


TOKENIZER_CPU_S_PER_REQUEST = 0.2
"""CPU seconds a request of SGLang's tokenizer manager process above which ``tokenizer_torch_threads: 1`` is proposed.
Measured on Qwen2.5-VL-7B's six-image requests (H100 machine, 16 vCPUs): 0.81-0.9 with torch's default threads, 0.035
with one (c5d3ab6, e534b6b), where one thread cut the burst's TTFT median to 0.64-0.67x."""


def _tokenizer_threads(plugin: dict[str, Any], seen: Observed) -> list[Change]:
    """``tokenizer_torch_threads: 1`` for a tokenizer manager that burned CPU seconds a request far beyond its work:
    torch's intra-op threads spinning on each request's few MB (SGLang's copy of the features into ``/dev/shm``),
    which SGLang's own tokenizer workers avoid by running torch on one thread. Read from SGLang's
    ``sglang:process_cpu_seconds_total{component="tokenizer"}`` (sampled every 5 s, so a short run's delta lags) and
    ``sglang:num_requests_total``."""
    from mm_scheduler.tune import Change

    if plugin.get("tokenizer_torch_threads") is not None:
        return []
    cpu = seen.host_counter("sglang:process_cpu_seconds", component="tokenizer")
    requests = seen.host_counter("sglang:num_requests")
    if not cpu or not requests:
        return []
    per_request = cpu / requests
    if per_request < TOKENIZER_CPU_S_PER_REQUEST:
        return []
    return [Change("sglang.tokenizer_torch_threads", 1,
                   f"SGLang's tokenizer manager process used {cpu:.1f} CPU-s for {requests:g} requests, "
                   f"{per_request:.2f} a request: torch's intra-op threads spinning on each request's features, "
                   "beside the scheduler's threads; SGLang's own tokenizer workers run torch on one thread. Measured "
                   "on Qwen2.5-VL: 0.8-0.9 -> 0.035 CPU-s a request, seed TTFT median 0.64-0.67x")]


LAUNCH_BOUND = 0.9
"""Share of a forward's time spent launching it above which the tower is launch-bound, the GPU waiting on the host:
Gemma 4's eager forwards launched for 31-39 ms of 32-40 ms (measured before fd957dd removed a per-layer read-back), and
its graphs won (5178309: forwards of 20-21 ms against 26-37). Qwen3-VL-8B's under Poisson load launched for 71-88 % of
31-48 ms forwards (1a3705d, db1d93c, H100): graphs cut the launch to 5-8 ms but the forward only to 37-38 ms (its GPU
time), and TTFT was no better (f4d38f4); on a seed burst (53 %, e214c80) they lost to their padding."""
GRAPH_BUCKET_SHARE = 0.2  # a histogram interval holding at least this share of forwards gets a bucket


def _graph_buckets(plugin: dict[str, Any], seen: Observed) -> list[Change]:
    """``vit_graph_patches`` for an eager tower whose forwards were launch-bound: a captured graph replays a
    forward in one launch, which a busy scheduler thread beside it (one GIL) no longer slows. Buckets are the
    patches-per-forward histogram's bounds of every interval holding a fifth of the forwards, and one bound above
    the largest of them where forwards went beyond it: a batch larger than every bucket is cut into runs of them
    (``vit_graphs.cut_into_runs``), so one outlier does not ask for a bucket of its size. Above 1,024 patches the
    histogram's bounds double, so such a forward pads to less than twice its patches."""
    from mm_scheduler.tune import Change

    patches, forwards = seen.histograms.get("patches_per_forward"), seen.histograms.get("batch_seconds")
    launches = seen.histograms.get("batch_launch_seconds")
    if plugin["vit_graph_patches"] or not all(h and h.count for h in (patches, forwards, launches)):
        return []
    share = launches.mean() / forwards.mean() if forwards.mean() else 0.0
    if share < LAUNCH_BOUND:
        return []
    finite = [(le, cum) for le, cum in patches.buckets if le != float("inf")]
    buckets, below, shares = [], 0.0, []
    for le, cum in finite:
        held = (cum - below) / patches.count
        if held >= GRAPH_BUCKET_SHARE:
            buckets.append(int(le))
        if cum > below:
            shares.append(f"{held:.0%} up to {int(le):,}")
        below = cum
    if not buckets:
        return []
    held_by_largest = dict(finite)[buckets[-1]]
    next_bound = next((int(le) for le, _ in finite if le > buckets[-1]), None)
    if held_by_largest < patches.count and next_bound is not None:
        buckets.append(next_bound)
    return [Change("sglang.vit_graph_patches", buckets,
                   f"{share:.0%} of a forward's {forwards.mean() * 1000:.0f} ms was spent launching it "
                   f"({patches.count:g} forwards): the tower is launch-bound, and a CUDA graph replays a forward "
                   f"in one launch; buckets from the patches a forward held ({', '.join(shares)}). Captured at "
                   "start-up, memory on top of the budget; needs --mm-attention-backend triton_attn and TP=1. "
                   "Measure against the eager tower: padding costs GPU time")]


def _encode_behind_a_queue(plugin: dict[str, Any], seen: Observed) -> list[Change]:
    """Prefills that block for nearly whole forwards mean the encodes started at arrival had no head start:
    the real server's Poisson runs (README, "Serving in a real SGLang server"), where the encoder's forward
    then only competed with the scheduler's own launches. Encoding at arrival only behind a queue is the
    setting for that traffic."""
    from mm_scheduler.tune import Change

    waits, forwards = seen.histograms.get("prefill_wait_seconds"), seen.histograms.get("batch_seconds")
    if plugin["early_encode_min_waiting"] or not waits or not waits.count or not forwards or not forwards.count:
        return []
    blocked = waits.share_above(0.005)
    if blocked < 0.5 or waits.mean() < 0.8 * forwards.mean():  # a head start shows as waits well under a forward
        return []
    queued = seen.histograms.get("queue_wait_seconds")
    if queued is not None and queued.mean() >= forwards.mean():  # a backlogged encoder lacks capacity, not timing
        return []
    early = seen.counter("prefill_items", source="early")
    if early < 0.5 * seen.counter("prefill_items"):  # the waits were mostly on-demand encodes or fallbacks
        return []
    waited = seen.host.get("sglang:queue_time_seconds")  # requests that sat in SGLang's queue had a head start
    if waited is not None and waited.count and waited.mean() >= forwards.mean():
        return []
    return [Change("sglang.early_encode_min_waiting", 1,
                   f"{blocked:.0%} of {waits.count:g} prefills blocked more than 5 ms on the encoder, "
                   f"{waits.mean() * 1000:.0f} ms on average against {forwards.mean() * 1000:.0f} ms a forward: "
                   "encodes at arrival had no head start; encode at arrival only behind a waiting request")]


def settings_of(server_args: object) -> dict[str, Any] | None:
    """The settings a ServerArgs carries (set by the CLI hook or, for Engine users, the env hook)."""
    return getattr(server_args, ATTR, None)
