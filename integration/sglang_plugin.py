"""SGLang plugin: entry point ``mm_scheduler_sglang.sglang_plugin:register`` in group ``sglang.srt.plugins``.

SGLang's ``load_plugins()`` calls :func:`register` in every process it starts (launcher, scheduler,
detokenizer), honouring ``SGLANG_PLUGINS``, then applies the hooks through its ``HookRegistry``.
Every hook is inert unless the coalescer was enabled (``--enable-mm-coalescer``,
``--mm-coalescer-config`` or ``MM_COALESCER=1``): they check for the settings or the active service
and otherwise call straight through.

Hooks, and why each sits where it does:

* ``ServerArgs.add_cli_args`` (AFTER): our flags join SGLang's own parser (and ``--config`` files).
* ``ServerArgs.from_cli_args`` (AROUND) and ``ServerArgs.resolve_once`` (AFTER, for ``Engine``
  users, whose keyword arguments cannot carry our settings; ``check_server_args`` before 0.5.19, see
  :mod:`.sglang_compat`): store the validated settings as an underscore attribute that pickles into
  children. Both run in the launcher on both paths before any child is spawned. (``__post_init__`` is
  no hook point: msgspec binds it when the struct type is built, so replacing the class attribute
  later never runs.)
* ``Scheduler.__init__`` (AFTER): the model is loaded; pick its tower adapter, start the service
  (lockstep when TP>1) and only then hook that model class's ``get_*_feature`` (registered and
  applied through the same HookRegistry, in the scheduler only: other processes never import
  the model modules on our account).
* ``Scheduler._add_request_to_queue`` (AROUND): the arrival point of every request on every rank;
  its items are submitted for encoding at once.
* ``Scheduler.run_batch`` (AFTER): the forward (launched synchronously on the scheduler thread,
  embeddings included) has consumed the items whose tokens lie before each request's
  ``extend_end``; those holds are dropped, so decode-phase requests hold no results.
* ``TokenizerManager.__init__`` (AFTER, registered only with ``sglang.uint8_pixels`` or
  ``sglang.fast_mm_token_check`` (both on by default) or ``sglang.preprocess_thread``, in the launcher once its
  arguments are first resolved): the HF processors' image-token check counts lists on an old transformers
  (:mod:`.token_check`), the image processor is asked for uint8 pixels (:mod:`.pixel_transport`; each scheduler
  reads how to widen them from its own copy of the processor), then the multimodal preprocessing moves to a thread
  of its own (:mod:`.preprocess`).
* ``Scheduler.get_next_batch_to_run`` and, on PD prefill servers, ``get_next_disagg_prefill_batch_to_run``
  (AFTER): about once a second, the sweep releases holds of requests the scheduler no longer has.
* ``Req.release_mm_inputs_on_abort``, ``MultimodalInputs.release_features`` and
  ``Scheduler._maybe_clear_mm_inputs`` (BEFORE): where SGLang drops a request's media on abort or
  finish; the request's hold on its results is dropped too (queued units are withdrawn on abort).
  Before 0.5.22 there is no abort hook: the sweep releases an aborted request's results.

Where a target lives, and which exist, depends on the SGLang release: :mod:`.sglang_compat` decides
(one log line for each feature a release lacks; on an unsupported release, or one missing a hook
target, one log line and no hook at all).

Only this module's light imports run in the launcher; ``mm_scheduler`` (which imports torch and
prometheus_client) is imported in the scheduler once the service starts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookSource, HookType

from . import norm_lock, settings, sglang_compat

if TYPE_CHECKING:
    from .pixel_transport import Widening
    from .service import EncoderService

logger = logging.getLogger(__name__)

PLUGIN_NAME = "mm_coalescer"
# Where a scheduler keeps requests (lists, batches with .reqs, queues with .queue); the sweep's live set.
# (No "cur_batch": no supported release has one; scripts/check-sglang-versions.py checks the other names.)
LIVE_REQUEST_HOLDERS = ("waiting_queue", "running_batch", "last_batch", "chunked_req",
                        "disagg_prefill_bootstrap_queue", "disagg_prefill_inflight_queue")
SWEEP_INTERVAL_S = 1.0
# Longest the scheduler loop waits for an early encode outside a prefill before it takes requests in again.
INTAKE_SLICE_S = 0.002
_RID_ATTR = "_mm_coalescer_rid"
SCHEDULER_FEATURES = ("abort_release",)
"""Features of :mod:`.sglang_compat` the scheduler-side plugin uses (a missing one is logged at start)."""

_service: EncoderService | None = None
_hooked_targets: set[str] = set()
_last_sweep = 0.0
_defer_prefill_s = 0.0
_early_encode_min_waiting = 0
_left_to_prefill: set[str] = set()  # arrivals not encoded early (early_encode_min_waiting), until a prefill
_deferred_since: dict[str, float] = {}
_bound_spent: set[str] = set()  # requests whose deferral bound ran out: never deferred again
_tokenizer_manager_hooked = False
_widening: Widening | None = None  # how this scheduler's uint8 pixels widen (sglang.uint8_pixels): set once built


def register() -> None:
    """Entry point: register the hooks (inert until the plugin is enabled).

    On an SGLang release outside the supported range, or one missing a hook target, one log line and no
    hook: SGLang runs unchanged (and does not know the plugin's flags).
    """
    compat = sglang_compat.current()
    problem = compat.problem()
    if problem is not None:
        sglang_compat.note(problem)
        return
    hooks: list[tuple[str | None, Callable[..., Any], HookType]] = [
        (sglang_compat.HOOKS["add_cli_args"], _after_add_cli_args, HookType.AFTER),
        (sglang_compat.HOOKS["from_cli_args"], _around_from_cli_args, HookType.AROUND),
        (compat.hook_target("engine_settings"), _after_resolve_once, HookType.AFTER),
        (sglang_compat.HOOKS["scheduler_init"], _around_scheduler_init, HookType.AROUND),
        (sglang_compat.HOOKS["get_next_batch_to_run"], _after_get_next_batch, HookType.AFTER),
        (sglang_compat.HOOKS["get_next_disagg_prefill_batch_to_run"], _after_get_next_batch, HookType.AFTER),
        (sglang_compat.HOOKS["get_new_batch_prefill"], _around_get_new_batch_prefill, HookType.AROUND),
        (sglang_compat.HOOKS["release_memory_occupation"], _before_release_memory, HookType.BEFORE),
        (sglang_compat.HOOKS["add_request_to_queue"], _around_add_request_to_queue, HookType.AROUND),
        (sglang_compat.HOOKS["run_batch"], _after_run_batch, HookType.AFTER),
        (sglang_compat.HOOKS["maybe_clear_mm_inputs"], _before_clear_mm_inputs, HookType.BEFORE),
        (compat.hook_target("abort_release"), _before_release_on_abort, HookType.BEFORE),  # None before 0.5.22
        (sglang_compat.HOOKS["release_features"], _before_release_features, HookType.BEFORE),
    ]
    for target, hook, kind in hooks:
        if target is not None:
            HookRegistry.register(target, hook, kind)
    __import__("mm_scheduler_sglang.epd", fromlist=["register_epd"]).register_epd(compat)  # EPD encoder servers


def active_service() -> EncoderService | None:
    """The service of this scheduler process, if the plugin is enabled and the model supported."""
    return _service


# --- server arguments ---------------------------------------------------------------------------
def _after_add_cli_args(_result: None, parser: Any) -> None:
    settings.add_cli_args(parser)


def _around_from_cli_args(original: Callable[..., Any], cls: type, args: Any) -> Any:
    server_args = original(cls, args)
    try:
        chosen = settings.resolve(getattr(args, "enable_mm_coalescer", False),
                                  getattr(args, "mm_coalescer_config", None),
                                  getattr(args, "mm_coalescer_max_held_mb", None))
    except ValueError as exc:
        raise SystemExit(f"mm-coalescer: {exc}") from None
    setattr(server_args, settings.ATTR, chosen)
    _hook_tokenizer_manager(chosen)
    return server_args


def _after_resolve_once(_result: None, server_args: Any) -> None:
    """``Engine(**kwargs)`` takes no unknown kwargs: read the environment when no flag set it.

    After ``ServerArgs.resolve_once`` (0.5.19+) or ``check_server_args`` (before): both run in the launcher
    before any child is spawned, and 0.5.23's schedulers run ``resolve_once`` again on the arguments they were
    handed, settings included: the tokenizer manager is hooked only where they were first resolved, the launcher
    (``from_cli_args`` hooked it on the command line's path)."""
    if settings.ATTR not in server_args.__dict__:
        try:
            chosen = settings.resolve(False, None)
        except ValueError as exc:
            raise SystemExit(f"mm-coalescer: {exc}") from None
        setattr(server_args, settings.ATTR, chosen)
        _hook_tokenizer_manager(chosen)
    advice = settings.preprocessing_advice(server_args) if getattr(server_args, settings.ATTR) else None
    if advice:
        logger.info(advice)


# --- tokenizer manager --------------------------------------------------------------------------
_TOKENIZER_MANAGER_SETTINGS = ("uint8_pixels", "fast_mm_token_check", "preprocess_thread", "tokenizer_torch_threads")


def _hook_tokenizer_manager(chosen: dict[str, Any] | None) -> None:
    """With a setting of :data:`_TOKENIZER_MANAGER_SETTINGS`, hook ``TokenizerManager.__init__`` (once, in the
    launcher, where SGLang builds the tokenizer manager after parsing its arguments; see
    ``sglang_compat.TOKENIZER_MANAGER_INIT``)."""
    global _tokenizer_manager_hooked
    plugin = (chosen or {}).get("plugin", {})
    if not any(plugin.get(name) for name in _TOKENIZER_MANAGER_SETTINGS) or _tokenizer_manager_hooked:
        return
    _tokenizer_manager_hooked = True
    HookRegistry.register(sglang_compat.TOKENIZER_MANAGER_INIT, _after_tokenizer_manager_init, HookType.AFTER)
    HookRegistry.apply_hooks()


def _after_tokenizer_manager_init(_result: None, tokenizer_manager: Any, *args: Any, **kwargs: Any) -> None:
    """``sglang.tokenizer_torch_threads``: torch's intra-op threads in this process (the launcher's, where the
    tokenizer manager runs; no model runs here); ``sglang.uint8_pixels``: its image processor sends uint8 pixels
    (:mod:`.pixel_transport`), before any clone of it is taken; ``sglang.fast_mm_token_check``: its HF processors
    count image tokens on lists (:mod:`.token_check`); ``sglang.preprocess_thread``: its multimodal preprocessing
    moves off its event loop (:mod:`.preprocess`)."""
    chosen = settings.settings_of(kwargs.get("server_args", args[0] if args else None))
    plugin = (chosen or {}).get("plugin", {})
    mm_processor = getattr(tokenizer_manager, "mm_processor", None)
    if plugin.get("tokenizer_torch_threads"):
        import torch

        was = torch.get_num_threads()
        torch.set_num_threads(plugin["tokenizer_torch_threads"])
        logger.info("mm-coalescer: sglang.tokenizer_torch_threads: the tokenizer manager's process runs torch on %d "
                    "thread(s), was %d", torch.get_num_threads(), was)
    if plugin.get("fast_mm_token_check") and mm_processor is not None:
        try:
            from . import token_check

            why_not = token_check.install()
            if why_not is None:
                logger.info("mm-coalescer: sglang.fast_mm_token_check: HF processors count image tokens as "
                            "transformers 5.17 does")
            else:
                logger.info("mm-coalescer: sglang.fast_mm_token_check has no effect: %s", why_not)
        except Exception:
            logger.error("mm-coalescer: sglang.fast_mm_token_check failed; transformers' own check stays",
                         exc_info=True)
    if plugin.get("uint8_pixels") and mm_processor is not None:
        try:
            from . import pixel_transport

            why_not = pixel_transport.narrow_images(mm_processor)
            if why_not is None:
                logger.info("mm-coalescer: sglang.uint8_pixels: %s sends image pixels as uint8",
                            type(mm_processor).__name__)
            else:
                logger.info("mm-coalescer: sglang.uint8_pixels off: %s", why_not)
        except Exception:
            logger.error("mm-coalescer: sglang.uint8_pixels failed; image pixels stay float32", exc_info=True)
    if not plugin.get("preprocess_thread"):
        return
    try:
        from . import preprocess

        preprocess.move_off_the_loop(tokenizer_manager)
    except Exception:
        logger.error("mm-coalescer: sglang.preprocess_thread failed to start; SGLang preprocesses on its own loop",
                     exc_info=True)


# --- scheduler lifecycle ------------------------------------------------------------------------
def _around_scheduler_init(original: Callable[..., Any], scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """Build the scheduler (its CUDA streams at high priority if configured), then start the service.

    Nothing here may take the server down: any failure of the plugin logs one error and leaves
    SGLang's own encoder path in place.
    """
    chosen = settings.settings_of(kwargs.get("server_args", args[0] if args else None))
    priority = (chosen or {}).get("plugin", settings.PLUGIN_DEFAULTS)["llm_stream_priority"]
    with llm_streams_at_high_priority(enabled=chosen is not None and priority == "high"):
        original(scheduler, *args, **kwargs)
    if chosen is None:
        return
    global _widening
    _widening = None
    try:  # the widening first: a service that then fails to start leaves the arrival hook to widen on the CPU
        _widening = widening_for(scheduler, chosen)
        _start_for_scheduler(scheduler, chosen)
    except Exception:
        logger.error("mm-coalescer: the plugin failed to start; SGLang encodes media with its own method",
                     exc_info=True)
        stop()


def _start_for_scheduler(scheduler: Any, chosen: dict[str, Any]) -> None:
    if sglang_compat.pp_rank() != 0:  # the vision tower lives on the first pipeline stage only
        return
    model = _model_of(scheduler)
    if model is None:
        logger.warning("mm-coalescer: this scheduler's worker exposes no model_runner.model; plugin off")
        return
    if scheduler.disaggregation_mode.name == "DECODE":
        logger.info("mm-coalescer: PD decode server: the vision tower does not run here; plugin off")
        return
    start(model, chosen, tp_size=sglang_compat.tp_size(), scheduler=scheduler, widening=_widening)


def _encodes_here(scheduler: Any) -> bool:
    """Whether this scheduler runs the vision tower: the first pipeline stage, and not a PD decode server (its
    prompts arrive prefilled, KV from the prefill server; a retracted request's prefix is restored or recomputed
    there)."""
    return sglang_compat.pp_rank() == 0 and scheduler.disaggregation_mode.name != "DECODE"


def _model_of(scheduler: Any) -> Any:
    return getattr(getattr(getattr(scheduler, "tp_worker", None), "model_runner", None), "model", None)


def widening_for(scheduler: Any, chosen: dict[str, Any]) -> Widening | None:
    """How this scheduler's requests' uint8 image pixels become float32, if it encodes any: ``sglang.uint8_pixels``
    on, a model whose tokenizer manager narrows them (``pixel_transport.ARCHITECTURES``), a scheduler that runs the
    tower (:func:`_encodes_here`), read from the scheduler's own copy of the HF image processor (SGLang loads it as the
    tokenizer manager does; none with ``--skip-tokenizer-init``, where the tokenizer manager does not narrow). Other
    models' uint8 features are theirs (SGLang 0.5.23's Kimi-K3 sends raw uint8 on purpose) and are never touched."""
    from .pixel_transport import ARCHITECTURES, Widening

    if not chosen.get("plugin", {}).get("uint8_pixels") or type(_model_of(scheduler)).__name__ not in ARCHITECTURES:
        return None
    if not _encodes_here(scheduler):
        return None
    return Widening.of(getattr(getattr(scheduler, "processor", None), "image_processor", None))


@contextlib.contextmanager
def llm_streams_at_high_priority(enabled: bool) -> Iterator[None]:
    """While SGLang builds its scheduler and model runner, CUDA streams are created at the highest priority.

    SGLang creates its schedule and forward streams at priority 0, CUDA's lowest, the same as the
    encoder stream, so encoder kernels compete equally with decode. Streams cannot change priority
    after creation and many objects keep references to them, so they are created high from the start.
    """
    if not enabled or not torch_cuda_available():
        yield
        return
    import torch

    stream_cls = torch.cuda.Stream
    original_new = stream_cls.__dict__["__new__"]
    _least, greatest = torch.cuda.Stream.priority_range()

    def high_priority_new(cls: type, device: Any = None, priority: int = 0, **kwargs: Any) -> Any:
        return original_new(cls, device, priority=min(priority, greatest), **kwargs)  # lower number = higher

    stream_cls.__new__ = high_priority_new  # type: ignore[method-assign]
    try:
        yield
    finally:
        stream_cls.__new__ = original_new  # type: ignore[method-assign]
    logger.info("mm-coalescer: SGLang's CUDA streams were created at priority %d (encoder stream: 0)", greatest)


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def start(model: Any, chosen: dict[str, Any], *, tp_size: int, scheduler: Any = None,
          widening: Widening | None = None) -> EncoderService | None:
    """Start the service for ``model`` and route its encoder methods through it.

    Unsupported models are left untouched (one log line). With TP>1 and a sharded tower, lockstep
    mode is forced (the async coalescer's clock-driven batches would differ between ranks and hang
    their collectives) and failures are agreed over the scheduler's TP CPU group.
    """
    global _service
    from mm_scheduler import config_from_dict

    from .adapters import tower_for, why_unsupported
    from .modes import choose_mode, tp_agreement
    from .position_lookup import look_up_positions
    from .service import EncoderService
    from .vision_attention import pass_uniform_max_seqlen

    reason = why_unsupported(model)
    tower = None if reason is not None else tower_for(model)
    if tower is None:
        logger.info("mm-coalescer: plugin off for this model (%s); SGLang encodes its media as usual", reason)
        return None
    tower.widening = widening
    config = config_from_dict(dict(chosen["values"]), source=chosen["config_path"] or "defaults")
    norm_lock.serialize_norm_launches()  # the tower's norms now run beside the text model's (norm_lock.py)
    pass_uniform_max_seqlen(model)  # no GPU read-back a layer in SigLIP / Gemma 4 (vision_attention.py)
    look_up_positions(model)  # no [P, 2, 10240] one-hot in Gemma 4's patch embedder (position_lookup.py)
    collective_free = bool(getattr(tower, "collective_free", False))
    mode = choose_mode(chosen["mode"], tp_size, dp_encoder=collective_free)
    if chosen["mode"] == "async" and mode == "lockstep":
        logger.warning("mm-coalescer: %s=async ignored with TP=%d and a sharded vision tower; using lockstep",
                       settings.ENV_MODE, tp_size)
    agree = tp_agreement(scheduler) if mode == "lockstep" and tp_size > 1 and scheduler is not None else None
    max_held = chosen.get("max_held_bytes", int(settings.DEFAULT_MAX_HELD_MB * 2**20))
    plugin = chosen.get("plugin", settings.PLUGIN_DEFAULTS)
    global _defer_prefill_s, _early_encode_min_waiting
    _defer_prefill_s = plugin["defer_prefill_ms"] / 1000.0
    if _defer_prefill_s > 0 and tp_size > 1:
        # Which encodes are done is known per rank; TP ranks must still form the same prefill batches.
        logger.warning("mm-coalescer: sglang.defer_prefill_ms ignored at TP=%d: ranks would defer different "
                       "requests", tp_size)
        _defer_prefill_s = 0.0
    _early_encode_min_waiting = plugin["early_encode_min_waiting"]
    # Inline needs every rank to take the same path: SGLang's own method may run collectives (a DP encoder).
    _service = EncoderService(tower, config, lockstep=mode == "lockstep", max_held_bytes=max_held,
                              prefill_wait_s=plugin["prefill_wait_ms"] / 1000.0, agree=agree,
                              inline_when_idle=_early_encode_min_waiting > 0 and tp_size == 1).start()
    try:
        _capture_graphs(tower, plugin.get("vit_graph_patches") or [], tp_size)
        _hook_model_class(type(model))
    except BaseException:
        stop()
        raise
    logger.info("mm-coalescer: %s mode for %s (budget %d bytes, %d bytes/patch)", _service.mode,
                type(model).__name__, _service.budget_bytes, _service.bytes_per_patch)
    for line in sglang_compat.current().degraded(SCHEDULER_FEATURES):
        sglang_compat.note(line)
    return _service


def _capture_graphs(tower: Any, buckets: list[int], tp_size: int) -> None:
    """Capture the tower's CUDA graphs now, while nothing else runs on the GPU (before serving)."""
    if not buckets:
        return
    fitting = [b for b in buckets if b * _service.bytes_per_patch <= _service.budget_bytes]
    if len(fitting) < len(buckets):  # bytes_per_patch "auto" is measured at start, so it may exceed the guess
        logger.warning("mm-coalescer: ViT CUDA graph buckets %s dropped: their activations (%d bytes a patch) exceed "
                       "the budget of %d bytes", [b for b in buckets if b not in fitting], _service.bytes_per_patch,
                       _service.budget_bytes)
    if not fitting:
        logger.warning("mm-coalescer: ViT CUDA graphs off: no bucket fits the budget")
        return
    buckets = fitting
    try:
        logger.info("mm-coalescer: %s", tower.use_graphs(buckets, tp_size=tp_size))
        if tower.graphs is not None:
            tower.graphs.on_forward = _service.count_graph_forward
    except Exception as exc:  # a failed capture costs the graphs, not the plugin
        logger.warning("mm-coalescer: ViT CUDA graphs off: capture failed (%s: %s); the tower runs eagerly",
                       type(exc).__name__, exc)


def stop() -> None:
    """Close the service (queued work fails, model methods fall through to SGLang's own)."""
    global _service, _defer_prefill_s, _early_encode_min_waiting
    _defer_prefill_s, _early_encode_min_waiting = 0.0, 0  # the settings of the service that stops
    _left_to_prefill.clear()
    _bound_spent.clear()
    _deferred_since.clear()
    if _service is not None:
        _service.close()
        _service = None


def _hook_model_class(model_cls: type) -> None:
    """Route the encoder methods of exactly this class (never a parent's: subclasses keep SGLang's)."""
    from .adapters import SUPPORTED_MODELS, qualified_name

    source = HookSource(plugin_name=PLUGIN_NAME, dist_name=None)
    target = qualified_name(model_cls)
    for method in SUPPORTED_MODELS[target]:
        if f"{target}.{method}" not in _hooked_targets:
            _hooked_targets.add(f"{target}.{method}")
            HookRegistry.register(f"{target}.{method}", _around_get_feature, HookType.AROUND, source=source)
    HookRegistry.apply_hooks()


# --- requests -----------------------------------------------------------------------------------
def _around_add_request_to_queue(original: Callable[..., Any], scheduler: Any, req: Any,
                                 *args: Any, **kwargs: Any) -> Any:
    result = original(scheduler, req, *args, **kwargs)
    service = _service
    retracted = kwargs.get("is_retracted", args[0] if args else False)
    mm_inputs = req.multimodal_inputs
    mode = scheduler.disaggregation_mode.name
    if _widening is not None and service is None and mm_inputs is not None:  # no hooked method will widen them
        from .pixel_transport import widen_items

        widen_items(mm_inputs.mm_items, _widening)
    if service is None or retracted or mm_inputs is None or req.finished() or mode == "DECODE":
        return result
    queue = getattr(scheduler, "waiting_queue", None)
    if mode == "NULL" and queue is not None and (not queue or queue[-1] is not req):
        return result  # refused (queue limit, priority): SGLang appends every request it admits
    setattr(mm_inputs, _RID_ATTR, req.rid)
    # The gate is for a unified server; a PD prefill server's bootstrap wait is a head start of its own.
    if _early_encode_min_waiting and mode == "NULL" and waiting_ahead(scheduler) < _early_encode_min_waiting:
        _left_to_prefill.add(req.rid)  # encoded by its prefill, or when a prefill batch passes it over
        return result
    service.on_arrival(req.rid, items_to_encode_early(scheduler, req))
    return result


def waiting_ahead(scheduler: Any) -> int:
    """Requests ahead of the one SGLang has just appended to its waiting queue, counting a chunked
    prefill in progress (it goes first); O(1), since it runs for every arrival."""
    return len(scheduler.waiting_queue) - 1 + (scheduler.chunked_req is not None)


def _encode_passed_over(scheduler: Any) -> None:
    """Requests left to their prefill at arrival that the prefill batch just formed did not take (full
    batch, KV or token limits): they wait after all, so they get their head start now."""
    service = _service
    if not _left_to_prefill or service is None:
        return
    pending = set(_left_to_prefill)
    _left_to_prefill.clear()  # the rest were prefilled, or have left
    for req in scheduler.waiting_queue:
        if req.rid in pending and not req.finished() and req.multimodal_inputs is not None:
            service.on_arrival(req.rid, items_to_encode_early(scheduler, req))


def items_to_encode_early(scheduler: Any, req: Any) -> list[Any]:
    """The request's items that its prefill will really encode: not those SGLang serves from its caches.

    An item whose tokens all lie in the cached prompt prefix (radix cache) is never embedded
    again, and one in SGLang's multimodal embedding cache is taken from there; encoding either at
    arrival would be wasted. Both caches can change before the prefill runs: an item skipped here
    that turns out to be needed is encoded on demand, as SGLang would.
    """
    cached_upto = cached_prefix_len(scheduler, req)
    embedding_cache = _embedding_cache()
    return [item for item in req.multimodal_inputs.mm_items
            if item is not None and not (item.offsets and item.offsets[-1][1] < cached_upto)
            and not (embedding_cache is not None and item.hash is not None and embedding_cache.has(item.hash))]


def cached_prefix_len(scheduler: Any, req: Any) -> int:
    """Tokens of ``req``'s prompt already in the radix cache, matched as SGLang's prefill matches them."""
    tree_cache = getattr(scheduler, "tree_cache", None)
    if tree_cache is None or getattr(scheduler, "disable_radix_cache", False):
        return 0
    try:
        return sglang_compat.cached_prefix_len(tree_cache, req)
    except Exception:  # a cache this plugin does not understand: assume nothing is cached
        logger.debug("mm-coalescer: could not match the prefix of %s", req.rid, exc_info=True)
        return 0


def _embedding_cache() -> Any:
    return sglang_compat.embedding_cache()


def _after_run_batch(_result: Any, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """The forward of ``batch`` is launched, so its prefill chunks have taken their embeddings."""
    service = _service
    if service is None or not batch.forward_mode.is_extend():
        return
    for req in batch.reqs:
        end = sglang_compat.extend_end(req)
        if req.multimodal_inputs is not None and end is not None:
            service.consumed(req.rid, req.multimodal_inputs.mm_items, end)


def _after_get_next_batch(_result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """About once a second: release holds of requests the scheduler no longer has anywhere."""
    global _last_sweep
    service = _service
    now = time.monotonic()
    if service is None or now - _last_sweep < SWEEP_INTERVAL_S:
        return
    _last_sweep = now
    live = live_rids(scheduler)
    service.sweep(live)
    for rid in set(_deferred_since) - live:
        del _deferred_since[rid]
    _bound_spent.intersection_update(live)


def _around_get_new_batch_prefill(original: Callable[..., Any], scheduler: Any, running_batch: Any,
                                  *args: Any, **kwargs: Any) -> Any:
    """``defer_prefill_ms``: keep requests whose early encode is unfinished out of this prefill batch.

    A prefill that blocks on an encode blocks the whole scheduler loop: no decode step, no prefill of
    requests that are ready, and no intake of new requests (on the real server, a seed burst's hand-over
    to the scheduler took 0.32-0.42 s a request with blocking prefills, 0.16-0.21 s without: README, lever
    table). So a request whose encode is in flight sits out, for at most ``defer_prefill_ms``: while the
    GPU has other work, that work runs; when it has none, the scheduler waits for the encodes here,
    ``INTAKE_SLICE_S`` at a time, and goes back to taking requests in between. The waiting queue is
    restored in its own order.
    """
    try:
        return _prefill_batch(original, scheduler, running_batch, *args, **kwargs)
    finally:
        _encode_passed_over(scheduler)


def _prefill_batch(original: Callable[..., Any], scheduler: Any, running_batch: Any, *args: Any,
                   **kwargs: Any) -> Any:
    service = _service
    if service is None or _defer_prefill_s <= 0:
        return original(scheduler, running_batch, *args, **kwargs)
    queue = scheduler.waiting_queue
    bounded = {req.rid for req in queue if req.rid in _deferred_since}
    now = time.monotonic()
    held_back = {id(req) for req in queue if _defer(service, req, now)}
    if held_back and not _other_work(scheduler, running_batch, queue, held_back):
        if scheduler.disaggregation_mode.name != "NULL":
            # A PD prefill server's loop also polls bootstrap and KV transfers: no wait there, and no deferral
            # (a bound started earlier, while it decoded, keeps running).
            for req in queue:
                if req.rid not in bounded:
                    _deferred_since.pop(req.rid, None)
            held_back = set()
        else:
            service.wait_for_any([req.rid for req in queue if id(req) in held_back], INTAKE_SLICE_S)
            now = time.monotonic()
            held_back = {id(req) for req in queue if id(req) in held_back and _defer(service, req, now)}
    if not held_back:
        return original(scheduler, running_batch, *args, **kwargs)
    scheduler.waiting_queue = [req for req in queue if id(req) not in held_back]
    try:
        return original(scheduler, running_batch, *args, **kwargs)
    finally:
        remaining = {id(req) for req in scheduler.waiting_queue}
        known = {id(req) for req in queue}
        scheduler.waiting_queue = ([req for req in queue if id(req) in held_back or id(req) in remaining]
                                   + [req for req in scheduler.waiting_queue if id(req) not in known])


def _other_work(scheduler: Any, running_batch: Any, queue: list[Any], held_back: set[int]) -> bool:
    """Whether the GPU has work besides the held-back requests: decode steps, a chunked prefill in progress, or
    (unified server) a waiting request whose encode is done. One left to its prefill (``early_encode_min_waiting``)
    is not: its prefill would encode it now, beside the encodes held back."""
    if running_batch is not None and not running_batch.is_empty():
        return True
    if scheduler.disaggregation_mode.name != "NULL":
        return False
    if getattr(scheduler, "chunked_req", None) is not None:
        return True
    return any(id(req) not in held_back and req.rid not in _left_to_prefill for req in queue)


def _defer(service: EncoderService, req: Any, now: float) -> bool:
    """Whether ``req`` should sit out this prefill: its encode runs and it has not waited too long.

    Once its bound has run out it is never deferred again, even if the prefill that followed did not take it
    (full batch, token budget): a fresh bound each time would let it wait past ``defer_prefill_ms``."""
    if req.rid in _bound_spent:
        return False
    if service.ready(req.rid):
        _deferred_since.pop(req.rid, None)
        return False
    since = _deferred_since.setdefault(req.rid, now)
    if now - since < _defer_prefill_s:
        return True
    del _deferred_since[req.rid]
    _bound_spent.add(req.rid)
    return False


def live_rids(scheduler: Any) -> set[str]:
    """Every request id the scheduler still holds in one of its queues or batches."""
    rids: set[str] = set()
    for name in LIVE_REQUEST_HOLDERS:
        holder = getattr(scheduler, name, None)
        if holder is None:
            continue
        reqs = getattr(holder, "reqs", None) or getattr(holder, "queue", None)
        if reqs is None:
            reqs = holder if isinstance(holder, list) else [holder]
        rids.update(getattr(req, "rid", None) for req in reqs)
    rids.discard(None)  # type: ignore[arg-type]
    return rids


def _before_release_memory(*_args: Any, **_kwargs: Any) -> None:
    if _service is not None:
        _service.release_all()


def _before_clear_mm_inputs(scheduler: Any, batch: Any) -> None:
    service = _service
    if service is None:
        return
    for req in batch.reqs:
        if req.finished():
            service.release(req.rid, aborted=False)


def _before_release_on_abort(req: Any) -> None:
    if _service is not None:
        _service.release(req.rid, aborted=True)


def _before_release_features(mm_inputs: Any) -> None:
    rid = getattr(mm_inputs, _RID_ATTR, None)
    if _service is not None and rid is not None:
        _service.release(rid, aborted=False)


# --- the encoder ----------------------------------------------------------------------------------
def _around_get_feature(original: Callable[..., Any], model: Any, items: list[Any]) -> Any:
    service = _service
    if service is None or not service.serves(model):
        if _widening is not None:  # SGLang's own method, on uint8 pixels (sglang.uint8_pixels): widened where they are
            from .pixel_transport import widen_items

            widen_items(items, _widening)
        return original(model, items)
    return service.encode(items, lambda subset: original(model, subset))
