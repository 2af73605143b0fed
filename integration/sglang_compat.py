"""The plugin's only version-aware code: which SGLang is installed, and how to read it (0.5.16 .. 0.5.23).

Everything the plugin reads from SGLang that differs between supported releases is a :class:`Row` of
:data:`ROWS`: one :class:`Form` per range of versions (oldest first; a form holds from its ``since`` up to
the next form's). The form to use is chosen from the installed version, never guessed with try/except,
and ``scripts/check-sglang-versions.py`` checks every row against each release's own code: the chosen
form's names exist, the next form's do not. :data:`SAME` lists what the plugin reads that is the same in
every supported release (hook targets included); that script checks it too.

What the rest of the plugin uses:

* :func:`current` (the installed SGLang as a :class:`Compat`) and :meth:`Compat.problem`: why the plugin
  must leave SGLang untouched (a version outside :data:`OLDEST` .. :data:`NEWEST`, or a hook target
  that does not resolve), else None; :meth:`Compat.hook_target`: a hook's target on this version, or
  None when the feature is missing here; :meth:`Compat.degraded`: one log line per missing feature.
* accessors, one per row: :func:`embedding_cache`, :func:`cuda_ipc_proxy_class`,
  :func:`cuda_ipc_copy_event_key`, :func:`extend_end`, :func:`cached_prefix_len`,
  :func:`processor_runs_off_loop`, :func:`features_kept_on_gpu`, :func:`tokenizer_manager_hashes_features`,
  :func:`pickles_ipc`,
  :func:`shm_pointer_class`,
  :func:`wrap_shm_features`, and
  :func:`tp_size` / :func:`pp_rank` (read from ``runtime_context.get_parallel()`` on every version:
  ``Scheduler.tp_size`` exists only from 0.5.22, ``Scheduler.ps.tp_size`` only up to 0.5.20).

Importing this module imports nothing from SGLang (the check script loads it without SGLang installed).
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import re
import zlib
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

Version = tuple[int, int, int]
OLDEST: Version = (0, 5, 16)
NEWEST: Version = (0, 5, 23)

_SB = "sglang.srt.managers.schedule_batch"
_MC = "sglang.srt.mem_cache"
_EPD = "sglang.srt.disaggregation.encoder"


@dataclass(frozen=True)
class Form:
    """How one thing is read from ``since`` on: ``how`` in words (None: absent), ``names`` it reads."""

    since: Version
    how: str | None
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    """One thing that differs between releases; ``degraded`` is the log line when its form is absent."""

    key: str
    what: str
    forms: tuple[Form, ...]
    degraded: str | None = None
    hook: bool = False
    """A hook: the first of a form's ``names`` is its target (the others are only checked)."""

    def form(self, version: Version) -> Form:
        chosen = self.forms[0]
        for form in self.forms:
            if form.since <= version:
                chosen = form
        return chosen


V16, V17, V18, V19, V20, V22 = (0, 5, 16), (0, 5, 17), (0, 5, 18), (0, 5, 19), (0, 5, 20), (0, 5, 22)
_MMP = "sglang.srt.multimodal.processors.base_processor.BaseMultimodalProcessor"

ROWS: tuple[Row, ...] = (
    Row("embedding_cache", "multimodal embedding cache", (
        Form(V16, "managers.mm_utils.embedding_cache",
             ("sglang.srt.managers.mm_utils.embedding_cache", "sglang.srt.managers.mm_utils.init_mm_embedding_cache")),
        Form(V18, "managers.mm_schedule.embedding_cache",
             ("sglang.srt.managers.mm_schedule.embedding_cache",
              "sglang.srt.managers.mm_schedule.init_mm_embedding_cache")),
    )),
    Row("cuda_ipc", "CUDA-IPC feature proxy class", (
        Form(V16, "utils.cuda_ipc_transport_utils",
             ("sglang.srt.utils.cuda_ipc_transport_utils.CudaIpcTensorTransportProxy",)),
        Form(V18, "multimodal.transport.cuda_ipc",
             ("sglang.srt.multimodal.transport.cuda_ipc.CudaIpcTensorTransportProxy",)),
    )),
    # Not a degradation: releases without the key never record a pending copy event on an item.
    Row("cuda_ipc_copy_event", "pending-copy event key of a CUDA-IPC item", (
        Form(V16, None),
        Form(V20, "cuda_ipc.CUDA_IPC_FEATURE_COPY_EVENT_KEY",
             ("sglang.srt.multimodal.transport.cuda_ipc.CUDA_IPC_FEATURE_COPY_EVENT_KEY",)),
    )),
    Row("extend_end", "end of a request's extend this round", (
        Form(V16, "Req.extend_range.end", (f"{_SB}.Req.extend_range",)),
        Form(V22, "Req.extend_end", (f"{_SB}.Req.extend_end",)),
    )),
    Row("prefix_match", "cached radix prefix of a waiting request", (
        Form(V16, "RadixKey + MatchResult.device_indices",
             (f"{_MC}.radix_cache.RadixKey", f"{_MC}.base_prefix_cache.MatchPrefixParams",
              f"{_MC}.base_prefix_cache.MatchResult.device_indices",
              f"{_MC}.base_prefix_cache.BasePrefixCache.swa_reprefill_tail_tokens")),
        Form(V22, "common._req_radix_key + MatchResult.device_prefix_len",
             (f"{_MC}.common._req_radix_key", f"{_MC}.base_prefix_cache.MatchPrefixParams",
              f"{_MC}.base_prefix_cache.MatchResult.device_prefix_len")),
    )),
    Row("engine_settings", "hook reading MM_COALESCER* for Engine(...) users", (
        Form(V16, "AFTER ServerArgs.check_server_args", ("sglang.srt.server_args.ServerArgs.check_server_args",)),
        Form(V19, "AFTER ServerArgs.resolve_once", ("sglang.srt.server_args.ServerArgs.resolve_once",)),
    ), hook=True),
    Row("abort_release", "release of held results on abort", (
        Form(V16, None),
        Form(V22, "BEFORE Req.release_mm_inputs_on_abort", (f"{_SB}.Req.release_mm_inputs_on_abort",)),
    ), degraded="release on abort falls back to the sweep (about 1 s later)", hook=True),
    # Not a degradation: before 0.5.17 no processor has SGLang's own executor, so sglang.preprocess_thread applies.
    Row("processor_executor", "SGLang's own multimodal processor threads (--mm-processor-worker-num)", (
        Form(V16, None),
        Form(V17, "BaseMultimodalProcessor.mm_processor_executor",
             (f"{_MMP}.mm_processor_executor", f"{_MMP}.process_and_combine_mm_data_async")),
    )),
    Row("epd", "EPD encoder-only batching (--mm-coalescer-epd)", (
        Form(V16, None),
        Form(V20, "AROUND disaggregation.encoder.runtime.launch_local_runtime",
             (f"{_EPD}.runtime.launch_local_runtime", f"{_EPD}.runtime._BATCHABLE_MODALITIES",
              f"{_EPD}.runtime.validate_encode_request", f"{_EPD}.server.MMError", f"{_EPD}.server.BadRequestError",
              f"{_EPD}.server.ENCODER_REQ_TIMEOUT", f"{_EPD}.server.encode_state_condition",
              f"{_EPD}.server._build_mm_aux_data", f"{_EPD}.server._get_mm_feature", f"{_EPD}.server._mm_feature_attrs",
              f"{_EPD}.server._preprocess_layout_digest", f"{_EPD}.server.MMEncoder._sync_tp_prepare_status",
              f"{_EPD}.server.MMEncoder._build_model_mm_items", f"{_EPD}.server.MMEncoder._acquire_encode_ref",
              f"{_EPD}.server.MMEncoder._release_encode_ref", f"{_EPD}.server.MMEncoder._stage_errors",
              f"{_EPD}.server.MMEncoder._stage_embedding", f"{_EPD}.preprocessor.EncoderPreprocessResult",
              f"{_EPD}.preprocessor._mm_grid_attrs", f"{_EPD}.preprocessor._convert",
              f"{_EPD}.preprocessor.EncoderPreprocessor.process_batch_mm_items",
              f"{_EPD}.preprocessor.EncoderPreprocessor._flatten_nested_items",
              f"{_EPD}.preprocessor.EncoderPreprocessor.get_num_patches", f"{_EPD}.receiver.EmbeddingData",
              "sglang.srt.managers.io_struct.sock_send", "sglang.srt.managers.io_struct.wrap_as_pickle")),
    ), degraded="EPD batching is unavailable (no disaggregation.encoder): encoder-only servers keep SGLang's own",
        hook=True),
)
ROW = {row.key: row for row in ROWS}

_SCHED = "sglang.srt.managers.scheduler.Scheduler"
_ARGS = "sglang.srt.server_args.ServerArgs"
# Hook targets the same on every supported release (a missing one leaves SGLang untouched).
HOOKS: dict[str, str] = {
    "add_cli_args": f"{_ARGS}.add_cli_args",
    "from_cli_args": f"{_ARGS}.from_cli_args",
    "scheduler_init": f"{_SCHED}.__init__",
    "get_next_batch_to_run": f"{_SCHED}.get_next_batch_to_run",
    # A PD prefill server's loop calls this instead of get_next_batch_to_run: the sweep runs there too.
    "get_next_disagg_prefill_batch_to_run":
        "sglang.srt.disaggregation.prefill.SchedulerDisaggregationPrefillMixin.get_next_disagg_prefill_batch_to_run",
    "get_new_batch_prefill": f"{_SCHED}.get_new_batch_prefill",
    "add_request_to_queue": f"{_SCHED}._add_request_to_queue",
    "run_batch": f"{_SCHED}.run_batch",
    "maybe_clear_mm_inputs": f"{_SCHED}._maybe_clear_mm_inputs",
    "release_features": f"{_SB}.MultimodalInputs.release_features",
    "release_memory_occupation":
        "sglang.srt.managers.scheduler_components.weight_updater.SchedulerWeightUpdaterManager.release_memory_occupation",
}

TOKENIZER_MANAGER_INIT = "sglang.srt.managers.tokenizer_manager.TokenizerManager.__init__"
"""Hooked only in the launcher and only with a tokenizer-manager setting on (``sglang.uint8_pixels`` or
``sglang.fast_mm_token_check``, on by default, or ``sglang.preprocess_thread``): importing its module sets SGLang's
uvloop event-loop policy for the whole process, which no other process of the server should get from the plugin."""

# The leading parameters the plugin's hooks read (by position or name) of each hook target; the check script
# verifies each release's target starts with them (later parameters may differ, as Scheduler.__init__'s do).
PARAMS: dict[str, tuple[str, ...]] = {
    HOOKS["add_cli_args"]: ("parser",),
    HOOKS["from_cli_args"]: ("cls", "args"),
    HOOKS["scheduler_init"]: ("self", "server_args"),
    HOOKS["get_next_batch_to_run"]: ("self",),
    HOOKS["get_next_disagg_prefill_batch_to_run"]: ("self",),
    HOOKS["get_new_batch_prefill"]: ("self", "running_batch"),
    HOOKS["add_request_to_queue"]: ("self", "req", "is_retracted"),
    HOOKS["run_batch"]: ("self", "batch"),
    HOOKS["maybe_clear_mm_inputs"]: ("self", "batch"),
    HOOKS["release_features"]: ("self",),
    HOOKS["release_memory_occupation"]: ("self",),
    TOKENIZER_MANAGER_INIT: ("self", "server_args"),
    "sglang.srt.server_args.ServerArgs.check_server_args": ("self",),
    "sglang.srt.server_args.ServerArgs.resolve_once": ("self",),
    f"{_SB}.Req.release_mm_inputs_on_abort": ("self",),
    f"{_EPD}.runtime.launch_local_runtime": ("server_args",),
}

LAYERNORM = "sglang.srt.layers.layernorm"
NORM_KERNELS = ("rmsnorm", "fused_add_rmsnorm", "gemma_rmsnorm", "gemma_fused_add_rmsnorm")
"""The sgl-kernel norm launchers SGLang's norm layers call: module globals of :data:`LAYERNORM` on CUDA builds
(imported from sgl_kernel there on every supported release; absent without CUDA). See ``norm_lock.py``."""

SAME: tuple[str, ...] = (
    *HOOKS.values(),
    "sglang.srt.plugins.hook_registry.HookRegistry", "sglang.srt.plugins.hook_registry.HookType",
    "sglang.srt.plugins.hook_registry.HookSource", "sglang.srt.plugins.load_plugins",
    "sglang.srt.runtime_context.get_parallel", "sglang.srt.runtime_context.ParallelContext.tp_size",
    "sglang.srt.runtime_context.ParallelContext.pp_rank",
    f"{_SCHED}.attn_tp_cpu_group", f"{_SCHED}.tree_cache", f"{_SCHED}.waiting_queue",
    f"{_SCHED}.disaggregation_mode", f"{_SCHED}.tp_worker", f"{_SCHED}.disable_radix_cache",
    f"{_SCHED}.running_batch", f"{_SCHED}.last_batch", f"{_SCHED}.chunked_req",
    "sglang.srt.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration.use_data_parallel",
    f"{_SB}.Req.multimodal_inputs", f"{_SB}.Req.origin_input_ids", f"{_SB}.Req.extra_key", f"{_SB}.Req.finished",
    f"{_SB}.MultimodalInputs.mm_items", f"{_SB}.MultimodalDataItem.offsets", f"{_SB}.MultimodalDataItem.hash",
    f"{_SB}.MultimodalDataItem.precomputed_embeddings", f"{_SB}.MultimodalDataItem.model_specific_data",
    f"{_SB}.Modality", "sglang.srt.disaggregation.utils.DisaggregationMode",
    "sglang.srt.model_executor.forward_batch_info.ForwardMode",
    "sglang.srt.environ.envs.SGLANG_VIT_ENABLE_CUDA_GRAPH",
    "sglang.srt.layers.attention.vision.VisionSdpaAttention",
    "sglang.srt.layers.attention.vision.VisionTritonAttention",
    "sglang.srt.layers.attention.vision.resolve_precomputed_max_seqlen",
    "sglang.srt.layers.attention.vision._get_cu_seqlens_for_shape",
    "sglang.srt.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",
    "sglang.srt.models.qwen2_5_vl.Qwen2_5_VisionTransformer",
    "sglang.srt.models.qwen2_5_vl.Qwen2_5_VisionTransformer.enable_cg",
    "sglang.srt.models.qwen3_vl.Qwen3VLForConditionalGeneration",
    "sglang.srt.models.qwen3_vl.Qwen3VLMoeVisionModel",
    "sglang.srt.models.qwen3_vl_moe.Qwen3VLMoeForConditionalGeneration",
    "sglang.srt.models.gemma3_mm.Gemma3ForConditionalGeneration",
    "sglang.srt.models.gemma3_mm.Gemma3MultiModalProjector", "sglang.srt.models.siglip.SiglipVisionModel",
    "sglang.srt.models.gemma4_mm.Gemma4ForConditionalGeneration",
    "sglang.srt.models.gemma4_mm.Gemma4MultimodalEmbedder",
    "sglang.srt.models.gemma4_vision.Gemma4VisionEncoder",
    "sglang.srt.models.gemma4_vision.Gemma4VisionPatchEmbedder._position_embeddings",
    TOKENIZER_MANAGER_INIT, "sglang.srt.managers.tokenizer_manager.TokenizerManager.mm_processor",
    f"{_MMP}._processor", f"{_MMP}.process_mm_data_async",
    "sglang.srt.environ.envs.SGLANG_MM_PRECOMPUTE_HASH", "sglang.srt.managers.mm_utils.ShmPointerMMData",
    "sglang.srt.managers.mm_utils.ShmPointerMMData.shm_name", "sglang.srt.managers.mm_utils.wrap_shm_features",
    "sglang.srt.managers.io_struct._USE_PICKLE_IPC",
    f"{_SB}.MultimodalDataItem.feature",
)
CUDA_ONLY: tuple[str, ...] = tuple(f"{LAYERNORM}.{name}" for name in NORM_KERNELS)
"""Read on every release, but defined only on CUDA builds: the check script checks them with :data:`SAME`."""


def parse_version(text: str) -> Version | None:
    """``"0.5.23"``, ``"0.5.23.post1"`` -> ``(0, 5, 23)``; None for anything without three numbers."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", text or "")
    return None if match is None else (int(match[1]), int(match[2]), int(match[3]))


def _dotted(version: Version) -> str:
    return ".".join(map(str, version))


def _resolves(target: str) -> bool:
    """Whether a hook target resolves as SGLang's HookRegistry will resolve it (module path, then attribute)."""
    obj_path, _, attr = target.rpartition(".")
    try:
        return hasattr(pkgutil.resolve_name(obj_path), attr)
    except Exception:  # not importable here at all (absent, or failing on import): missing as well
        return False


class Compat:
    """What the installed SGLang (``version_text``) offers the plugin."""

    def __init__(self, version_text: str) -> None:
        self.version_text = version_text
        self.version = parse_version(version_text)
        self._missing: list[str] | None = None

    @property
    def supported(self) -> bool:
        return self.version is not None and OLDEST <= self.version <= NEWEST

    def form(self, key: str) -> Form:
        assert self.version is not None, "no form for an unsupported version"
        return ROW[key].form(self.version)

    def has(self, key: str) -> bool:
        return self.supported and self.form(key).how is not None

    def hook_target(self, key: str) -> str | None:
        """The target of a hook that differs between releases, or None where this release lacks it."""
        return self.form(key).names[0] if self.has(key) else None

    def hook_targets(self) -> list[str]:
        """Every hook target the plugin needs on this release (those of missing features left out)."""
        optional = [self.hook_target(row.key) for row in ROWS if row.hook]
        return [*HOOKS.values(), *(t for t in optional if t is not None)]

    def missing_targets(self) -> list[str]:
        """Hook targets that do not resolve (imports SGLang's modules, as applying the hooks would)."""
        if self._missing is None:
            self._missing = [t for t in self.hook_targets() if not _resolves(t)]
        return self._missing

    def problem(self) -> str | None:
        """Why the plugin must register nothing on this SGLang (one log line), or None."""
        if not self.supported:
            return (f"mm-coalescer: sglang {self.version_text} is not supported (supported: {_dotted(OLDEST)} to "
                    f"{_dotted(NEWEST)}); the plugin registers no hooks and SGLang runs unchanged")
        missing = self.missing_targets()
        if missing:
            return (f"mm-coalescer: sglang {self.version_text} lacks hook target(s) {', '.join(missing)}; the plugin "
                    "registers no hooks and SGLang runs unchanged")
        return None

    def degraded(self, keys: tuple[str, ...] | None = None) -> list[str]:
        """One log line per feature that cannot work on this release (of ``keys``, default all)."""
        return [f"mm-coalescer: sglang {self.version_text}: {row.degraded}" for row in ROWS
                if row.degraded is not None and (keys is None or row.key in keys) and not self.has(row.key)]


NOTED_ENV = "MM_COALESCER_NOTED"
"""Checksums of the lines :func:`note` has logged; SGLang's children inherit it, so a line shows once per server."""


def note(line: str) -> bool:
    """Log ``line`` (a WARNING) unless this process or the one that spawned it already did; True if logged."""
    mark = f"{zlib.crc32(line.encode()):08x}"
    seen = os.environ.get(NOTED_ENV, "").split(",")
    if mark in seen:
        return False
    os.environ[NOTED_ENV] = ",".join([*filter(None, seen), mark])
    logger.warning("%s", line)
    return True


_current: Compat | None = None


def current() -> Compat:
    """The installed SGLang, read once per process from ``sglang.version`` (the code that actually runs)."""
    global _current
    if _current is None:
        from sglang.version import __version__

        _current = Compat(__version__)
    return _current


def _import(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


# --- accessors: one per row ------------------------------------------------------------------------
def embedding_cache_module() -> Any:
    """The module holding SGLang's multimodal embedding cache (``embedding_cache``, ``init_mm_embedding_cache``)."""
    return importlib.import_module(current().form("embedding_cache").names[0].rpartition(".")[0])


def embedding_cache() -> Any:
    """SGLang's multimodal embedding cache of this process, or None when it has none (not set up)."""
    return getattr(embedding_cache_module(), "embedding_cache", None)


def cuda_ipc_proxy_class() -> type:
    """SGLang's CUDA-IPC feature proxy class (CUDA-VMM proxies subclass it)."""
    return _import(current().form("cuda_ipc").names[0])


def cuda_ipc_copy_event_key() -> str | None:
    """Key under which SGLang keeps an item's pending host/device copy event, or None (never recorded)."""
    form = current().form("cuda_ipc_copy_event")
    return None if form.how is None else _import(form.names[0])


def extend_end(req: Any) -> int | None:
    """Where this round's extend of ``req`` ends (its prefill chunk), None when it has none."""
    if current().form("extend_end").how == "Req.extend_end":
        return req.extend_end
    extend_range = req.extend_range
    return None if extend_range is None else extend_range.end


def cached_prefix_len(tree_cache: Any, req: Any) -> int:
    """Tokens of ``req``'s prompt in the radix cache, matched with the key SGLang's prefill builds."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams

    ids = req.origin_input_ids
    if current().form("prefix_match").names[0].endswith("_req_radix_key"):
        from sglang.srt.mem_cache.common import _req_radix_key

        key = _req_radix_key(tree_cache, req, ids)
        return int(tree_cache.match_prefix(MatchPrefixParams(key=key)).device_prefix_len)
    from sglang.srt.mem_cache.radix_cache import RadixKey

    tail = tree_cache.swa_reprefill_tail_tokens()  # SWA layouts re-prefill the window: cap as Req does
    key = RadixKey(token_ids=ids, extra_key=req.extra_key, limit=max(0, len(ids) - tail) if tail else None)
    return len(tree_cache.match_prefix(MatchPrefixParams(key=key)).device_indices)


def processor_runs_off_loop(mm_processor: Any) -> bool:
    """Whether SGLang itself runs this multimodal processor's HF processor off the tokenizer manager's loop."""
    return current().has("processor_executor") and getattr(mm_processor, "mm_processor_executor", None) is not None


def features_kept_on_gpu(mm_processor: Any) -> str | None:
    """The flags that keep this multimodal processor's features on the GPU (``--mm-feature-transport cuda_ipc``,
    0.5.23's ``cuda_vmm``, or 0.5.16's ``--keep-mm-feature-on-device``); None when they reach the scheduler through
    host memory (SGLang's ``cpu`` feature transport)."""
    transport = getattr(mm_processor, "mm_feature_transport", None)
    if transport == "cpu" and not getattr(mm_processor, "keep_mm_feature_on_device", False):
        return None
    return f"--mm-feature-transport {transport} or --keep-mm-feature-on-device"


def tokenizer_manager_hashes_features() -> bool:
    """Whether SGLang's tokenizer manager hashes each request's features after preprocessing
    (``SGLANG_MM_PRECOMPUTE_HASH``), which reads them as tensors there."""
    return bool(_import("sglang.srt.environ.envs").SGLANG_MM_PRECOMPUTE_HASH.get())


def pickles_ipc() -> bool:
    """Whether SGLang pickles what its processes send each other (``SGLANG_USE_PICKLE_IPC``, on by default), rather
    than encoding it with msgpack."""
    return bool(_import("sglang.srt.managers.io_struct._USE_PICKLE_IPC"))


def shm_pointer_class() -> type:
    """SGLang's one-node feature wrapper (``ShmPointerMMData``: a ``/dev/shm`` segment's name, shape and dtype)."""
    return _import("sglang.srt.managers.mm_utils.ShmPointerMMData")


def wrap_shm_features() -> Any:
    """SGLang's hand-over of a request's CPU features to shared memory before its send (a no-op where its
    transport is not shared memory)."""
    return _import("sglang.srt.managers.mm_utils.wrap_shm_features")


def tp_size() -> int:
    """Tensor-parallel size of this scheduler process."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_size


def pp_rank() -> int:
    """Pipeline-parallel rank of this scheduler process."""
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().pp_rank
