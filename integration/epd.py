"""The coalescer as the batcher of SGLang's encoder-only (EPD) server.

``--encoder-only`` servers batch through ``EncoderScheduler`` (``disaggregation/encoder/runtime.py``):
up to ``SGLANG_ENCODER_MAX_BATCH_SIZE`` queued requests, no memory budget, video one request at a
time, preprocessing inside the batch (``MMEncoder.batch_encode``), so patch counts are unknown
while batching. :class:`CoalescedEncoderScheduler` is a drop-in replacement (``start``/``stop``/
``submit``), installed by an AROUND hook on ``runtime.launch_local_runtime`` when enabled:

* ``submit`` preprocesses the request at once with SGLang's own ``EncoderPreprocessor`` on a thread
  pool (off the event loop), so every image and video has its patch count before batching; each
  grid entry becomes one :class:`~mm_scheduler.EncodeItem` and goes to the asyncio Coalescer, which
  forms patch-count-bucketed, budgeted batches across requests (videos included).
* The tower's ``forward`` runs on the coalescer's forward thread: rank 0 broadcasts the batch to the
  TP workers with SGLang's own message (``{"type": "batch_encode", "modality", "requests"}`` over
  the existing ZMQ PUSH sockets, one synthetic single-item request per unit), joins the same
  collectives a worker's ``MMEncoder.batch_encode`` issues (``_sync_tp_prepare_status`` and the
  model's ``get_*_feature`` on the same concatenated input), and copies the result to host
  memory on the executor's stream (pinned, non-blocking; the coalescer waits for its CUDA event on
  a helper thread). Workers run SGLang's unmodified code: they need nothing from this package.
* Results are staged as SGLang ``EmbeddingData`` in ``MMEncoder.req_states``, so
  ``execute_encode_pipeline`` delivers them to prefill servers through SGLang's transport, unchanged.
* Errors are per request, as SGLang reports them (``MMEncoder._stage_errors``): malformed or
  undecodable input and requests that can never fit the budget fail at submit with 400; a unit the
  tower fails on is isolated by bisection; a dead TP worker fails in-flight and later requests with
  503 instead of hanging; a cancelled (disconnected) request's queued units are withdrawn.

Enable with ``--mm-coalescer-epd`` or ``MM_COALESCER_EPD=1``; coalescer settings come from
``MM_COALESCER_CONFIG`` (same YAML as the in-process plugin) when set.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import torch

logger = logging.getLogger(__name__)

ENV_EPD = "MM_COALESCER_EPD"
ENV_CONFIG = "MM_COALESCER_CONFIG"
_TRUE = {"1", "true", "yes", "on"}
_SEND_TIMEOUT_MS = 10_000  # a PUSH to a worker that stopped reading must not block the forward thread forever
# Models whose image and video encoders are the same packed tower call, so video units may share a forward
# with images at TP=1 (Qwen2.5-VL: get_image_feature and get_video_feature both run self.visual(pixels, grid)).
_MIXABLE_MODEL_TYPES = {"qwen2_5_vl"}


def enabled() -> bool:
    """True when ``--mm-coalescer-epd`` was given or ``MM_COALESCER_EPD`` is set."""
    return os.environ.get(ENV_EPD, "").strip().lower() in _TRUE


# --- plugin registration -------------------------------------------------------------------------
class _EnableAction(argparse.Action):
    """The flag sets the environment variable: the encoder runtime is built in this same process."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True)
        os.environ[ENV_EPD] = "1"
        _note_if_unavailable()


def _note_if_unavailable() -> None:
    """EPD asked for on a release without SGLang's ``disaggregation.encoder``: say so once."""
    from .sglang_compat import current, note

    for line in current().degraded(("epd",)):
        note(line)


def _after_add_cli_args(_result: None, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mm-coalescer-epd", action=_EnableAction,
                        help="Encoder-only servers (--encoder-only): batch encode requests with the mm-scheduler "
                             f"coalescer instead of EncoderScheduler. Also enabled by {ENV_EPD}=1.")


def register_epd(compat: Any) -> None:
    """Register the EPD hooks through SGLang's HookRegistry (inert unless enabled).

    The flag exists on every supported release; where SGLang has no ``disaggregation.encoder`` (before
    0.5.20) using it logs one line and encoder-only servers keep SGLang's own batching.
    """
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .sglang_compat import HOOKS

    HookRegistry.register(HOOKS["add_cli_args"], _after_add_cli_args, HookType.AFTER)
    target = compat.hook_target("epd")
    if target is not None:
        HookRegistry.register(target, _around_launch_local_runtime, HookType.AROUND)
    elif enabled():
        _note_if_unavailable()


def _around_launch_local_runtime(original: Callable[..., Any], server_args: Any) -> Any:
    runtime = original(server_args)
    if enabled():
        install(runtime)
    return runtime


def install(runtime: Any, config: Any = None) -> CoalescedEncoderScheduler:
    """Replace ``runtime.scheduler`` (an EncoderRuntime) with the coalescing scheduler; route video to it."""
    from sglang.srt.disaggregation.encoder import runtime as runtime_module
    from sglang.srt.managers.schedule_batch import Modality

    from mm_scheduler import config_from_dict

    from .settings import check_config_file

    if config is None:  # validated as the launcher and `mm-scheduler check-config` validate it
        path = os.environ.get(ENV_CONFIG)
        checked = check_config_file(path) if path else None
        config = config_from_dict(checked["values"], source=checked["config_path"]) if checked else \
            config_from_dict({"name": "epd"})
    scheduler = CoalescedEncoderScheduler(runtime.encoder, runtime.send_sockets, config,
                                          worker_processes=list(runtime.tp_processes))
    runtime.scheduler = scheduler
    # execute_encode_pipeline sends only these modalities through the scheduler; videos too, now.
    runtime_module._BATCHABLE_MODALITIES.add(Modality.VIDEO)
    logger.info("mm-coalescer EPD: encoder batching by the coalescer (budget %d bytes)", scheduler.budget_bytes)
    return scheduler


# --- the tower -------------------------------------------------------------------------------------
@dataclass(slots=True)
class UnitMeta:
    """One grid entry (image, or whole video) of a request, as preprocessed on rank 0."""

    modality: Any  # sglang Modality
    leaf: Any  # the raw media item, re-sent to TP workers that preprocess for themselves
    grid: torch.Tensor  # [1, 3] slice of the processor's grid tensor
    tokens: int
    extras: dict[str, Any] = field(default_factory=dict)  # per-item processor outputs (e.g. second_per_grid_ts)
    shared: dict[str, Any] = field(default_factory=dict)  # per-batch processor outputs, passed whole


class WorkerDiedError(RuntimeError):
    """A TP worker of this encoder exited; sharded forwards cannot run any more."""


class EPDTower:
    """The encoder server's model as the coalescer sees it: ragged packed forwards of grid entries."""

    ragged = True

    def __init__(self, encoder: Any, send_sockets: Sequence[Any], bytes_per_patch: int | None = None) -> None:
        self.encoder = encoder
        self.send_sockets = list(send_sockets)
        on_cuda = str(getattr(encoder, "device", "cpu")).startswith("cuda")
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        self.bytes_per_patch = bytes_per_patch or _declared_bytes_per_patch(encoder)
        self.tp_size = len(self.send_sockets) + 1
        self.mix_modalities = self.tp_size == 1 and encoder.model_type in _MIXABLE_MODEL_TYPES
        self.dead: str | None = None
        self._batch_ids = iter(range(1 << 62))
        for sock in self.send_sockets:
            import zmq

            sock.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)

    def forward(self, units: Sequence[Any]) -> list[torch.Tensor]:
        """Run ``units`` (EncodeItems carrying :class:`UnitMeta`) and return one embedding per unit."""
        if self.dead is not None:
            raise WorkerDiedError(self.dead)
        groups: dict[Any, list[int]] = {}
        for index, unit in enumerate(units):
            modality = unit.meta["unit"].modality
            groups.setdefault("mixed" if self.mix_modalities else modality, []).append(index)
        outputs: list[torch.Tensor | None] = [None] * len(units)
        for key, indices in groups.items():
            metas = [units[i].meta["unit"] for i in indices]
            pixels = [units[i].pixel_values for i in indices]
            for i, out in zip(indices, self._forward_group(metas, pixels, mixed=key == "mixed"), strict=True):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def _forward_group(self, metas: list[UnitMeta], pixels: list[torch.Tensor], mixed: bool) -> list[torch.Tensor]:
        from sglang.srt.disaggregation.encoder.preprocessor import EncoderPreprocessResult, _mm_grid_attrs
        from sglang.srt.disaggregation.encoder.server import _mm_feature_attrs, _preprocess_layout_digest
        from sglang.srt.managers.io_struct import sock_send, wrap_as_pickle
        from sglang.srt.managers.schedule_batch import Modality

        enc = self.encoder
        modality = Modality.IMAGE if mixed else metas[0].modality
        grid = torch.cat([m.grid for m in metas], dim=0)
        tokens = [m.tokens for m in metas]
        if self.send_sockets:  # SGLang's own TP broadcast: the workers run MMEncoder.batch_encode on it
            batch = next(self._batch_ids)
            requests = [{"req_id": f"mmc{batch}/{i}", "modality": modality.name, "mm_items": [m.leaf],
                         "num_parts": 1, "part_idx": 0} for i, m in enumerate(metas)]
            message = wrap_as_pickle({"type": "batch_encode", "modality": modality.name, "requests": requests,
                                      "enter_time": time.time()})
            for sock in self.send_sockets:
                sock_send(sock, message)
        mm_inputs: dict[str, Any] = {_mm_feature_attrs[modality][0]: torch.cat(pixels, dim=0),
                                     _mm_grid_attrs[modality][0]: grid}
        if not mixed:
            mm_inputs.update(_merge_extras(metas))
        result = EncoderPreprocessResult(mm_inputs=mm_inputs, grid_thw=grid, token_counts=tokens)
        layout = _preprocess_layout_digest(_LayoutView([1] * len(metas), result))
        # The same status all_gather a worker's batch_encode issues before its forward; raises on every
        # rank alike when any rank failed to preprocess.
        enc._sync_tp_prepare_status(None, error_phase=0, layout_digest=layout)
        items = enc._build_model_mm_items(mm_inputs[_mm_feature_attrs[modality][0]], result,
                                          list(range(len(metas))), modality)
        target = enc.model.thinker if hasattr(enc.model, "thinker") else enc.model
        get_feature = getattr(target, f"get_{modality.name.lower()}_feature")
        with torch.inference_mode():
            embedding = get_feature(items)
        if embedding.dim() != 2:
            embedding = embedding.reshape(-1, embedding.shape[-1])
        if embedding.shape[0] != sum(tokens):
            raise RuntimeError(f"encoder produced {embedding.shape[0]} tokens, preprocessing expected {sum(tokens)}")
        if embedding.is_cuda:  # D2H on this (the executor's) stream; the coalescer waits for its event
            host = torch.empty(embedding.shape, dtype=embedding.dtype, pin_memory=True)
            host.copy_(embedding, non_blocking=True)
            embedding = host
        return list(torch.split(embedding, tokens, dim=0))


@dataclass(slots=True)
class _LayoutView:
    """What ``_preprocess_layout_digest`` reads of an EncodeContext."""

    items_per_req: list[int]
    preprocess_result: Any


def _merge_extras(metas: list[UnitMeta]) -> dict[str, Any]:
    merged: dict[str, Any] = dict(metas[0].shared)
    for key in metas[0].extras:
        values = [m.extras[key] for m in metas]
        merged[key] = torch.cat(values, dim=0) if isinstance(values[0], torch.Tensor) else \
            [v for value in values for v in value]
    return merged


def _declared_bytes_per_patch(encoder: Any) -> int:
    """Activation bytes per patch, ``hidden * 2 * depth * element size`` of the vision config (a safe upper
    bound: measured peaks are about half of it); the YAML's ``bytes_per_patch`` overrides it."""
    vision = getattr(encoder.model_config.hf_config, "vision_config", None) if hasattr(encoder, "model_config") \
        else getattr(getattr(encoder.model, "config", None), "vision_config", None)
    hidden = int(getattr(vision, "hidden_size", 1280))
    depth = int(getattr(vision, "depth", getattr(vision, "num_hidden_layers", 32)))
    return hidden * 2 * depth * int(getattr(encoder, "_element_size", 2))


# --- the scheduler ---------------------------------------------------------------------------------
class CoalescedEncoderScheduler:
    """Drop-in for SGLang's ``EncoderScheduler``: ``submit(request)`` returns the same result tuple."""

    def __init__(self, encoder: Any, send_sockets: Sequence[Any], config: Any = None, *,
                 worker_processes: Sequence[Any] = (), preprocess_workers: int = 4,
                 request_timeout: float | None = None) -> None:
        from sglang.srt.disaggregation.encoder import server as server_module

        from mm_scheduler import Coalescer, CoalescerConfig

        config = config or CoalescerConfig(name="epd")
        self.encoder = encoder
        declared = config.bytes_per_patch if isinstance(config.bytes_per_patch, int) else None
        self.tower = EPDTower(encoder, send_sockets, bytes_per_patch=declared)
        if len(send_sockets) and config.max_inflight_batches != 1:
            config = config.replace(max_inflight_batches=1)  # one batch_encode at a time, as workers run them
        self.coalescer = Coalescer(self.tower, config)
        self.budget_bytes = self.coalescer.budget_bytes
        self.request_timeout = float(request_timeout or server_module.ENCODER_REQ_TIMEOUT)
        self.worker_processes = list(worker_processes)
        self._pool = concurrent.futures.ThreadPoolExecutor(preprocess_workers, thread_name_prefix="mm-epd-preproc")
        self._thread_loops = threading.local()
        self._dead: asyncio.Future[str] | None = None
        self._started = False
        self.stats = {"submitted": 0, "ok": 0, "failed": 0, "cancelled": 0}

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the coalescer and the worker watchdog on the running loop (as EncoderScheduler.start)."""
        asyncio.get_running_loop().create_task(self.astart())

    async def astart(self) -> CoalescedEncoderScheduler:
        """``start`` for callers inside a coroutine; idempotent, and atomic (nothing inside suspends)."""
        if not self._started:
            loop = asyncio.get_running_loop()
            self._dead = loop.create_future()
            await self.coalescer.start()
            for rank, proc in enumerate(self.worker_processes, start=1):
                loop.add_reader(proc.sentinel, self._on_worker_exit, rank, proc)
            self._started = True
        return self

    async def stop(self) -> None:
        for proc in self.worker_processes:
            try:
                asyncio.get_running_loop().remove_reader(proc.sentinel)
            except (ValueError, OSError):
                pass
        await self.coalescer.aclose(cancel_pending=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _on_worker_exit(self, rank: int, proc: Any) -> None:
        asyncio.get_running_loop().remove_reader(proc.sentinel)
        proc.join(timeout=1)  # reap it, so its exit code is known
        reason = f"encoder TP worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
        logger.error("mm-coalescer EPD: %s; failing its requests", reason)
        self.tower.dead = reason
        if self._dead is not None and not self._dead.done():
            self._dead.set_result(reason)

    # --- requests ----------------------------------------------------------------------------
    async def submit(self, request: dict) -> tuple:
        """Preprocess, coalesce, encode and stage ``request``; returns SGLang's (nbytes, len, dim, err, code)."""
        from sglang.srt.disaggregation.encoder import server as server_module
        from sglang.srt.disaggregation.encoder.runtime import validate_encode_request
        from sglang.srt.managers.schedule_batch import Modality

        if not self._started:
            await self.astart()
        error = validate_encode_request(request)
        if error is not None:
            raise server_module.BadRequestError(error)
        enc = self.encoder
        modality = Modality.from_str(request["modality"])
        state = enc._acquire_encode_ref(request["req_id"])
        self.stats["submitted"] += 1
        try:
            async with server_module.encode_state_condition:
                server_module.encode_state_condition.notify_all()
            result = await asyncio.wait_for(self._encode_and_stage(request, modality), self.request_timeout)
            self.stats["ok"] += 1
            return result
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise
        except TimeoutError:
            self.stats["failed"] += 1
            raise
        except Exception as exc:
            self.stats["failed"] += 1
            return enc._stage_errors([request], modality, _as_mm_error(exc))[0]
        finally:
            await enc._release_encode_ref(state)

    async def _encode_and_stage(self, request: dict, modality: Any) -> tuple:
        from sglang.srt.disaggregation.encoder.receiver import EmbeddingData
        from sglang.srt.disaggregation.encoder.server import _build_mm_aux_data

        from mm_scheduler import EncodeItem

        if self.tower.dead is not None:
            raise WorkerDiedError(self.tower.dead)
        loop = asyncio.get_running_loop()
        pre = await loop.run_in_executor(self._pool, self._preprocess, request, modality)
        metas, pixels = _split_units(self.encoder, pre, request, modality)
        items = [EncodeItem(p, num_patches=int(p.shape[0]), meta={"unit": m}) for m, p in zip(metas, pixels,
                                                                                           strict=True)]
        encode = asyncio.ensure_future(self.coalescer.encode(items))
        try:
            done, _ = await asyncio.wait({encode, self._dead}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            encode.cancel()
            raise
        if encode not in done:
            encode.cancel()
            raise WorkerDiedError(self._dead.result())
        outputs = encode.result()
        embedding = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        mm_data = EmbeddingData(request["req_id"], request["num_parts"], request["part_idx"], pre.grid_thw, modality,
                                embedding, **_build_mm_aux_data(pre.mm_inputs, self.encoder.model_type))
        self.encoder._stage_embedding(mm_data)
        return embedding.nbytes, embedding.shape[0], embedding.shape[1], None, None

    def _preprocess(self, request: dict, modality: Any) -> Any:
        """SGLang's preprocessor for one request, on a pool thread (its own loop per thread)."""
        loop = getattr(self._thread_loops, "loop", None)
        if loop is None:
            loop = self._thread_loops.loop = asyncio.new_event_loop()
        result, _ = loop.run_until_complete(self.encoder.preprocessor.process_batch_mm_items([request], modality))
        return result


def _split_units(encoder: Any, pre: Any, request: dict, modality: Any) -> tuple[list[UnitMeta], list[torch.Tensor]]:
    """One unit per grid entry: its pixel rows, grid, token count, raw leaf and per-item processor outputs."""
    from sglang.srt.disaggregation.encoder.preprocessor import _convert, _mm_grid_attrs
    from sglang.srt.disaggregation.encoder.server import _get_mm_feature, _mm_feature_attrs

    preprocessor = encoder.preprocessor
    leaves = preprocessor._flatten_nested_items(request["mm_items"])
    grid = _convert(pre.grid_thw)
    if not isinstance(grid, torch.Tensor) or grid.dim() != 2 or len(leaves) != grid.shape[0]:
        raise ValueError(f"{len(leaves)} media items gave {getattr(grid, 'shape', '?')} grid entries; the coalescer "
                         "needs one grid entry per item")
    feature = _convert(_get_mm_feature(pre.mm_inputs, modality))
    n = grid.shape[0]
    skip = set(_mm_feature_attrs[modality]) | set(_mm_grid_attrs[modality])
    per_item = {k: _convert(v) for k, v in pre.mm_inputs.items() if k not in skip and _is_per_item(_convert(v), n)}
    shared = {k: _convert(v) for k, v in pre.mm_inputs.items() if k not in skip and k not in per_item}
    metas, pixels, offset = [], [], 0
    for i in range(n):
        patches = preprocessor.get_num_patches(grid[i], modality)
        pixels.append(feature[offset: offset + patches])
        offset += patches
        extras = {k: v[i: i + 1] for k, v in per_item.items()}
        metas.append(UnitMeta(modality, leaves[i], grid[i: i + 1], int(pre.token_counts[i]), extras, shared))
    if offset != feature.shape[0]:
        raise ValueError(f"preprocessing gave {feature.shape[0]} patch rows, the grid says {offset}")
    return metas, pixels


def _is_per_item(value: Any, n: int) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n) or \
        (isinstance(value, list) and len(value) == n)


def _as_mm_error(exc: BaseException) -> BaseException:
    """Our errors as SGLang's MMError with the HTTP status a client should see."""
    from sglang.srt.disaggregation.encoder.server import MMError

    from mm_scheduler import CoalescerClosedError, EncodeError, InvalidItemError, QueueFullError

    if isinstance(exc, MMError):
        return exc
    if isinstance(exc, (InvalidItemError, ValueError, TypeError)):
        return MMError(f"bad request: {exc}", code=HTTPStatus.BAD_REQUEST)
    if isinstance(exc, (QueueFullError, CoalescerClosedError, WorkerDiedError)):
        return MMError(str(exc), code=HTTPStatus.SERVICE_UNAVAILABLE)
    if isinstance(exc, EncodeError):
        return MMError(f"{exc} (cause: {exc.__cause__!r})", code=HTTPStatus.INTERNAL_SERVER_ERROR)
    return MMError(f"{type(exc).__name__}: {exc}", code=HTTPStatus.INTERNAL_SERVER_ERROR)
