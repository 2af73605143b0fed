"""The scheduler-process side: early encoding at arrival, results taken by result key at prefill.

One :class:`EncoderService` lives in each SGLang scheduler process that serves a supported model.
Two backends do the encoding:

* ``async``: a :class:`~mm_scheduler.Coalescer` on its own event loop thread (uvloop when
  installed). Work is handed over with ``asyncio.run_coroutine_threadsafe``; the tower runs on the
  coalescer's forward thread and CUDA stream, overlapping the scheduler and the model's forward.
* ``lockstep`` (TP>1 with a sharded tower): a :class:`~mm_scheduler.lockstep.LockstepEncoder`.
  Arrival only queues; the prefill forward that needs a result runs the queued batches, in queue
  order, on the scheduler thread and stream, where SGLang runs its own encoder.

Who calls it: in sglang 0.5.23 every hook the plugin installs runs on the scheduler process's main
thread (the overlap scheduler overlaps with CUDA streams, not threads); PD bootstrap and the
detokenizer live in other threads or processes that never touch the service. It is nevertheless
safe to call from any thread: one lock guards the bookkeeping, and nothing blocks while holding it.

CUDA: pixels may have been produced on the caller's current stream (SGLang's schedule or forward
stream, a CUDA-IPC rebuild): an event recorded there at submit orders the encoder stream after
them. Results were produced on the encoder stream and are read on the caller's: each is tied to the
consuming stream (``record_stream``) before any kernel there touches it, so the allocator cannot
recycle its memory until the consumer is done, whoever drops the last reference.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

import torch
from prometheus_client import Counter, Gauge, Histogram

from mm_scheduler import (
    Coalescer,
    CoalescerClosedError,
    CoalescerConfig,
    CoalescerError,
    Encoded,
    EncodeItem,
    QueueFullError,
)
from mm_scheduler.lockstep import LockstepEncoder, LockstepTicket

from .adapters import SGLangTower, offloaded_by_sglang, on_one_device
from .held import Deferred, HeldResults

logger = logging.getLogger(__name__)

# Imported only in scheduler processes, after SGLang has set PROMETHEUS_MULTIPROC_DIR.
PREFILL_ITEMS = Counter("mm_coalescer_prefill_items", "Items a prefill asked the encoder for, by where the result came "
                        "from: early (encoded since arrival), on_demand, inline (on the scheduler thread, idle "
                        "coalescer: a graph replay or SGLang's own method) or fallback (SGLang's own method after a "
                        "refusal or failure)",
                        ("coalescer", "source"))
PREFILL_WAIT = Histogram("mm_coalescer_prefill_wait_seconds", "Time the scheduler thread was blocked waiting for "
                         "encoder results inside a prefill", ("coalescer",),
                         buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
VIT_GRAPH_FORWARDS = Counter("mm_coalescer_vit_graph_forwards", "Forwards of a tower with captured ViT CUDA graphs "
                             "(vit_graph_patches), by outcome: replayed, or eager (no bucket held the batch, or a "
                             "replay was still queued on another stream)", ("coalescer", "outcome"))
# How far the encoder runs ahead of the prefills: results encoded (or queued) since arrival that no prefill has
# taken yet, against the cap (--mm-coalescer-max-held-mb), and the arrivals waiting for room under it.
HELD_BYTES = Gauge("mm_coalescer_held_bytes", "Bytes of results encoded or queued ahead of their prefill (capped by "
                   "max_held_mb)", ("coalescer",))
DEFERRED_ITEMS = Gauge("mm_coalescer_deferred_items", "Items waiting for room under the held-results cap, admitted in "
                       "arrival order as prefills take results", ("coalescer",))


def result_key(tower: SGLangTower, item: Any) -> Hashable:
    """What decides an item's encoding (the adapter's key when it defines one)."""
    key_of = getattr(tower, "result_key", None)
    return key_of(item) if key_of is not None else (item.modality.name.lower(), item.hash)


def _queue_keys(units: Sequence[EncodeItem]) -> list[Hashable]:
    """The keys the coalescer queues ``units`` under (a video unit becomes ``(key, frame)`` units)."""
    keys: list[Hashable] = []
    for unit in units:
        if unit.key is None:
            continue
        if unit.modality == "video":
            keys.extend((unit.key, frame) for frame in range(unit.pixel_values.shape[0]))
        else:
            keys.append(unit.key)
    return keys


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An event loop running forever on a daemon thread; other threads submit coroutines."""

    def __init__(self, name: str) -> None:
        self.loop = _new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._held_back = threading.local()
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        held_back = getattr(self._held_back, "coros", None)
        if held_back is None:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        held_back.append((coro, future))
        return future

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Coroutines this thread submits inside the block start in one loop callback when it ends.

        A request's images are submitted one by one; started separately, the first reaches an idle
        eager coalescer alone and the rest wait for the next forward (a lone 6-image request took two
        forwards, 1 + 5). Started in one callback, every one is queued before the dispatcher runs.
        """
        self._held_back.coros = []
        try:
            yield
        finally:
            coros, self._held_back.coros = self._held_back.coros, None
            if coros:
                self.loop.call_soon_threadsafe(_start_all, coros)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _start_all(coros: list[tuple[Any, concurrent.futures.Future[Any]]]) -> None:
    """On the loop: start each coroutine as a task whose outcome (or cancellation) its future mirrors."""
    for coro, future in coros:
        if future.cancelled():  # withdrawn before it started
            coro.close()
            continue
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda done, future=future: _settle(future, done))
        future.add_done_callback(
            lambda f, task=task: f.cancelled() and task.get_loop().call_soon_threadsafe(task.cancel))


def _settle(future: concurrent.futures.Future[Any], task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        future.cancel()
    elif future.set_running_or_notify_cancel():
        if task.exception() is not None:
            future.set_exception(task.exception())
        else:
            future.set_result(task.result())


class ExclusiveTower:
    """The adapter, with every forward under one lock that SGLang's own method also takes.

    SGLang's fallback ``get_*_feature`` (scheduler thread) and a coalescer forward (forward thread)
    would otherwise launch the same vision module at once: caches filled on first use, graph buffers.
    It orders launches, not the GPU work: a forward launched on the encoder stream may still run when
    the fallback's kernels start on SGLang's stream. Only a GPU buffer the module keeps between calls
    makes that a race: in 0.5.23's vision attention, the ``flashinfer_cudnn`` backend's workspace
    (NOTES, "Not verified"). The exclusion yields to a hang: whoever waits longer than ``wait_s`` for
    the lock runs anyway (one warning each time), so a forward abandoned by the coalescer's deadline
    can neither wedge the scheduler's fallback nor the health probe that restores the coalescer.
    """

    def __init__(self, tower: SGLangTower, wait_s: float) -> None:
        self._tower = tower
        self.wait_s = wait_s
        self.lock = threading.Lock()
        self.overrides = 0
        self._held_since = 0.0

    @contextlib.contextmanager
    def held(self, who: str) -> Iterator[None]:
        """Hold the tower; wait at most until the current holder has held it ``wait_s`` in all."""
        remaining = self.wait_s - (time.monotonic() - self._held_since)
        if not self.lock.acquire(timeout=max(0.0, remaining)):
            self.overrides += 1
            logger.warning("mm-coalescer: the vision tower has been busy for over %.0f ms (a hung forward?); %s runs "
                           "beside it", self.wait_s * 1000, who)
            yield
            return
        self._held_since = time.monotonic()
        try:
            yield
        finally:
            self.lock.release()

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        with self.held("a coalescer forward"):
            return self._tower.forward(units)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tower, name)


class EncoderService:
    """Routes an SGLang model's vision encoding through a coalescer (or lockstep encoder)."""

    def __init__(self, tower: SGLangTower, config: CoalescerConfig, *, lockstep: bool,
                 max_held_bytes: int = 1 << 30, prefill_wait_s: float = 2.0,
                 agree: Callable[[bool], bool] | None = None, inline_when_idle: bool = False) -> None:
        self.tower = tower
        self.config = config
        self.lockstep = lockstep
        self.prefill_wait_s = prefill_wait_s
        self.inline_when_idle = inline_when_idle
        """A prefill whose items were not encoded early, finding the coalescer idle, encodes them on its own thread
        (``tower.encode_now``: a graph replay, or SGLang's own method): there is nothing to batch them with, and
        the hop to the coalescer only adds to the wait (the plugin's early-encode gate, ``early_encode_min_waiting``,
        turns this on)."""
        self._agree = agree
        self._exclusive = ExclusiveTower(tower, wait_s=prefill_wait_s)
        # Results encoded ahead of their prefill wait on the GPU; beyond the cap arrivals wait
        # (deferred) until frees make room, and are encoded at prefill if their turn never comes.
        self._held: HeldResults[Any, Any] = HeldResults(max_held_bytes)
        self._lock = threading.Lock()
        self._suspects: set[str] = set()
        self._loop: LoopThread | None = None
        self._coalescer: Coalescer | None = None
        self._lockstep: LockstepEncoder | None = None
        self._closed = False
        self.counts = dict.fromkeys(("submitted", "shared", "deferred", "admitted", "taken_early",
                                     "encoded_on_demand", "released", "cancelled", "swept", "wait_timeouts",
                                     "fallbacks", "inline", "left_offloaded"), 0)

    @property
    def mode(self) -> str:
        return "lockstep" if self.lockstep else "async"

    @property
    def max_held_bytes(self) -> int:
        return self._held.max_bytes

    @property
    def held_bytes(self) -> int:
        return self._held.held_bytes

    @property
    def budget_bytes(self) -> int:
        return (self._lockstep or self._coalescer).budget_bytes  # type: ignore[union-attr]

    @property
    def bytes_per_patch(self) -> int:
        return (self._lockstep or self._coalescer).bytes_per_patch  # type: ignore[union-attr]

    def start(self) -> EncoderService:
        if self.lockstep:
            kwargs = {} if self._agree is None else {"agree": self._agree}
            self._lockstep = LockstepEncoder(self._exclusive, self.config, **kwargs)
        else:
            self._loop = LoopThread(f"mm-coalescer-{self.config.name}")
            try:
                self._coalescer = Coalescer(self._exclusive, self.config)
                self._loop.submit(self._coalescer.start()).result()
            except BaseException:
                self._loop.stop()
                raise
        return self

    def close(self) -> None:
        """Fail what is still queued and stop the loop thread (tests and orderly shutdown). Idempotent:
        a second call returns at once (the stopped loop would never run another close); later
        submissions raise CoalescerClosedError."""
        if self._closed:
            return
        self._closed = True
        if self._coalescer is not None and self._loop is not None:
            self._loop.submit(self._coalescer.aclose(cancel_pending=True)).result(timeout=60)
            self._loop.stop()
        with self._lock:
            self._held.clear()
            self._export_held()

    def serves(self, model: object) -> bool:
        return model is self.tower.model

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run an encode on the caller's thread (SGLang's own method, or an inline graph replay), never at the same
        time as a coalescer forward (unless that forward hangs: see :class:`ExclusiveTower`)."""
        with self._exclusive.held("the model's own method"):
            return fn()

    # --- arrival --------------------------------------------------------------------------------
    def on_arrival(self, rid: str, items: Sequence[Any]) -> None:
        """Submit a new request's items now; identical items already held are shared, not re-encoded."""
        with self._lock, self._together():
            for item in items:
                if item is None or item.hash is None or not self.tower.accepts(item):
                    continue
                key = result_key(self.tower, item)
                if self._held.join(rid, key):
                    self.counts["shared"] += 1
                    continue
                nbytes = self.tower.output_bytes(item)
                if not self._held.fits(nbytes):
                    self._held.defer(rid, key, nbytes, item)
                    self.counts["deferred"] += 1
                    continue
                handle = self._submit_quietly(item)
                if handle is not None:
                    self._held.add(rid, key, handle, nbytes)
                    self.counts["submitted"] += 1
            self._export_held()

    # --- prefill ---------------------------------------------------------------------------------
    def encode(self, items: Sequence[Any], original: Callable[[list[Any]], Any]) -> Any:
        """What the hooked ``get_*_feature`` returns: held results where present, the rest encoded now.

        Items this tower does not take (precomputed embeddings, unknown layouts), coalescer errors
        and a wait longer than ``prefill_wait_s`` fall back to the model's own method for the whole
        call, so SGLang's behaviour is the floor.
        """
        if not items or not all(self.tower.accepts(item) for item in items):
            return self._own_method(items, original, "fallback")
        started = time.perf_counter()
        deadline = started + self.prefill_wait_s
        with self._lock:
            handles = [self._held_handle(item) for item in items]
        if self.inline_when_idle and all(h is None for h in handles) and self._idle():
            try:
                return self._own_method(items, original, "inline")
            finally:  # the scheduler thread waited for this encode too
                PREFILL_WAIT.labels(self.config.name).observe(time.perf_counter() - started)
        self._expedite(h for h in handles if h is not None)
        outputs: list[list[torch.Tensor] | None] = [None] * len(items)
        missing: list[int] = []
        try:
            for i, handle in enumerate(handles):
                if handle is None:
                    missing.append(i)
                    continue
                try:
                    outputs[i] = self._wait(handle, deadline)
                    self.counts["taken_early"] += 1
                    PREFILL_ITEMS.labels(self.config.name, "early").inc()
                except QueueFullError as exc:  # backpressure at arrival, as configured: no fault to trace
                    logger.info("mm-coalescer: early encode of item %s was refused (%s); encoding it now",
                                items[i].hash, exc)
                    missing.append(i)
                except (CoalescerError, concurrent.futures.CancelledError):
                    logger.warning("mm-coalescer: early encode of item %s failed or was withdrawn; encoding it "
                                   "again", items[i].hash, exc_info=True)
                    missing.append(i)
            if missing:
                self._encode_on_demand(items, missing, outputs, deadline)
                self.counts["encoded_on_demand"] += len(missing)
                PREFILL_ITEMS.labels(self.config.name, "on_demand").inc(len(missing))
            consumer = [self.tower.assemble(item, self._for_consumer(out))  # type: ignore[arg-type]
                        for item, out in zip(items, outputs, strict=True)]
            return consumer[0] if len(consumer) == 1 else torch.cat(consumer, dim=0)
        except TimeoutError:
            self.counts["wait_timeouts"] += 1
            logger.warning("mm-coalescer: encoder results not ready within %.0f ms; using the model's own method",
                           self.prefill_wait_s * 1000)
            return self._own_method(items, original, "fallback")
        except Exception:  # CoalescerError, a withdrawn handle, or outputs that cannot be assembled
            logger.warning("mm-coalescer: encoding failed; using the model's own method", exc_info=True)
            return self._own_method(items, original, "fallback")
        finally:
            PREFILL_WAIT.labels(self.config.name).observe(time.perf_counter() - started)

    def count_graph_forward(self, replayed: bool) -> None:
        """The graphs' ``on_forward`` (``vit_graphs.CapturedForwards``): one forward of a tower with captured graphs,
        replayed or run eagerly."""
        VIT_GRAPH_FORWARDS.labels(self.config.name, "replayed" if replayed else "eager").inc()

    def _idle(self) -> bool:
        """No unit queued and no forward in flight (async mode; a racy read is fine: the tower lock serialises)."""
        if self._coalescer is None:
            return False
        stats = self._coalescer.stats()
        return stats["pending_units"] == 0 and stats["inflight_batches"] == 0

    def _own_method(self, items: Sequence[Any], original: Callable[[list[Any]], Any], source: str) -> Any:
        """The call on the scheduler thread: ``source`` "fallback" (the coalescer could not serve it: SGLang's own
        method, the floor) or "inline" (nothing to batch with: the tower's ``encode_now``, a captured graph where
        one holds the items); counted as ``fallbacks`` / ``inline`` and by source."""
        self.counts["fallbacks" if source == "fallback" else source] += 1
        PREFILL_ITEMS.labels(self.config.name, source).inc(len(items))

        def call() -> Any:
            on_device = on_one_device(items, self.tower.device, self.tower.widening)
            return self.tower.encode_now(on_device, original) if source == "inline" else original(on_device)

        return self.run_exclusive(call)

    def _held_handle(self, item: Any) -> Any:
        if item.hash is None:
            return None
        entry = self._held.entry(result_key(self.tower, item))
        return None if entry is None else entry.handle

    # --- release ---------------------------------------------------------------------------------
    def release(self, rid: str, *, aborted: bool = False) -> None:
        """Drop ``rid``'s holds; free results nobody holds and withdraw their queued units.

        ``aborted`` only documents the caller's reason: work nobody waits for any more is
        withdrawn either way (a finished request cannot need it).
        """
        with self._lock:
            freed = self._held.release(rid)
            self._after_free(freed)

    def consumed(self, rid: str, items: Sequence[Any], prefilled_upto: int) -> None:
        """``rid``'s prefill has passed every token of some items: it will not ask for them again.

        Only a retraction (re-prefill) could; it then encodes on demand, as SGLang itself would.
        Freeing here rather than at finish keeps decode-phase requests from filling the cap.
        """
        with self._lock:
            freed = []
            for item in items:
                if item.hash is None or not item.offsets or item.offsets[-1][1] >= prefilled_upto:
                    continue
                handle = self._held.consume(rid, result_key(self.tower, item))
                if handle is not None:
                    freed.append(handle)
            self._after_free(freed)

    def sweep(self, live_rids: Iterable[str]) -> int:
        """Safety net for exits that skip every release hook: drop holders absent from two sweeps running.

        ``live_rids`` are the requests the scheduler still has anywhere. Two sweeps, not one, so a
        request in transit between two of the scheduler's queues is never mistaken for gone; a
        mistaken release would only make its prefill encode on demand.
        """
        with self._lock:
            absent = self._held.holders() - set(live_rids)
            gone, self._suspects = absent & self._suspects, absent - self._suspects
            for rid in gone:
                self._after_free(self._held.release(rid))
            self.counts["swept"] += len(gone)
            return len(gone)

    def release_all(self) -> None:
        """The server releases its GPU memory (``release_memory_occupation``): hold nothing."""
        with self._lock:
            self._after_free(self._held.clear())

    def _after_free(self, freed: list[Any]) -> None:
        """Withdraw work nobody waits for, then admit deferred items that now fit (under the lock)."""
        self.counts["released"] += len(freed)
        for handle in freed:
            if self._cancel(handle):
                self.counts["cancelled"] += 1
        for deferred in self._held.admit():
            self._admit(deferred)
        self._export_held()

    def _export_held(self) -> None:
        """The held bytes and deferred items as gauges (under the lock, after every change)."""
        HELD_BYTES.labels(self.config.name).set(self._held.held_bytes)
        DEFERRED_ITEMS.labels(self.config.name).set(self._held.deferred_count)

    def _admit(self, deferred: Deferred[Any]) -> None:
        handle = self._submit_quietly(deferred.payload)
        self._held.admitted(deferred, handle)
        if handle is not None:
            self.counts["admitted"] += 1

    def stats(self) -> dict[str, Any]:
        """Service counters plus the backend's queue state (for logs, tests and debugging)."""
        backend = (self._coalescer.stats() if self._coalescer is not None
                   else {"pending_units": self._lockstep.pending_units, "forwards": self._lockstep.forwards})
        with self._lock:
            held = {"held_items": len(self._held), "held_bytes": self._held.held_bytes,
                    "deferred_items": self._held.deferred_count}
        return {**self.counts, **backend, **held, "exclusive_overrides": self._exclusive.overrides, "mode": self.mode}

    def ready(self, rid: str) -> bool:
        """Whether every result ``rid`` holds is encoded (a prefill would not block on it).

        Lockstep mode always answers True: its results are computed inside the prefill, and a
        rank-local answer must never change which requests a rank schedules.
        """
        if self._lockstep is not None:
            return True
        with self._lock:
            handles = self._held.handles_of(rid)
        return handles is not None and all(handle.done() for handle in handles)

    def wait_for_any(self, rids: Iterable[str], timeout_s: float) -> None:
        """Block up to ``timeout_s`` until one of these requests' early encodes finishes (the GIL is released);
        at once if one is ready already.

        A request with an item still deferred for memory has nothing to wait on yet: when none has, this just
        sleeps, so a caller polling in a loop does not spin.
        """
        with self._lock:
            held = [self._held.handles_of(rid) for rid in rids]
        if any(handles is not None and all(h.done() for h in handles) for handles in held):
            return  # one is ready already
        pending = [handle for handles in held for handle in handles or () if not handle.done()]
        if pending:
            concurrent.futures.wait(pending, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED)
        else:
            time.sleep(timeout_s)

    def held_keys(self) -> set[Hashable]:
        with self._lock:
            return self._held.keys()

    # --- backend plumbing ------------------------------------------------------------------------
    def _units(self, item: Any) -> list[EncodeItem]:
        """The item's units, with an event on the submitting thread's stream for CUDA pixels."""
        units = self.tower.units(item)
        cuda = [u for u in units if u.pixel_values.is_cuda]
        if cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(cuda[0].pixel_values.device))
            for unit in cuda:
                unit.ready = ready
        return units

    def _together(self) -> contextlib.AbstractContextManager[None]:
        """Submissions inside reach the coalescer together (async mode; lockstep queues in order anyway)."""
        return self._loop.together() if self._loop is not None else contextlib.nullcontext()

    def _encode_on_demand(self, items: Sequence[Any], missing: list[int], outputs: list[Any], deadline: float) -> None:
        """Encode ``items[i]`` for each ``i`` in ``missing`` into ``outputs[i]``, jumping the queue. If one fails or
        the wait runs out, the rest are withdrawn: the caller falls back, and a lockstep queue, which only a
        prefill runs, would otherwise keep them for good."""
        fresh: list[Any] = []
        try:
            with self._together():
                for i in missing:
                    fresh.append(self._submit(items[i], urgent=True))
            for i, handle in zip(missing, fresh, strict=True):
                outputs[i] = self._wait(handle, deadline)
        except BaseException:
            for handle in fresh:
                self._cancel(handle)
            raise

    def _submit(self, item: Any, *, urgent: bool = False) -> Any:
        """Queue ``item``'s units; raises CoalescerError (invalid, queue full, closed)."""
        if self._closed:
            raise CoalescerClosedError("the encoder service is closed")
        units = self._units(item)
        if self._lockstep is not None:
            return self._lockstep.submit(units)
        handle = self._loop.submit(self._coalescer.encode(units, urgent=urgent))  # type: ignore[union-attr]
        handle.unit_keys = _queue_keys(units)  # type: ignore[attr-defined]
        return handle

    def _submit_quietly(self, item: Any) -> Any:
        """Early encoding is an optimisation: if the backend refuses, or SGLang's copy of the feature to the host may
        still be landing (:func:`offloaded_by_sglang`), the prefill encodes on demand."""
        if offloaded_by_sglang(item):
            self.counts["left_offloaded"] += 1
            return None
        try:
            return self._submit(item)
        except CoalescerError:
            logger.warning("mm-coalescer: not encoding an item early", exc_info=True)
            return None

    def _expedite(self, handles: Iterable[Any]) -> None:
        """A prefill is about to block on these: their queued units jump the coalescer's queue."""
        if self._coalescer is None:
            return  # lockstep: result() runs the queued batches in order, deterministically
        keys = [unit_key for handle in handles if not handle.done()
                for unit_key in getattr(handle, "unit_keys", ())]
        if keys:
            self._loop.loop.call_soon_threadsafe(self._coalescer.expedite, keys)  # type: ignore[union-attr]

    def _wait(self, handle: Any, deadline: float) -> list[torch.Tensor]:
        if isinstance(handle, LockstepTicket):
            return self._lockstep.result(handle)  # type: ignore[union-attr]
        try:
            return handle.result(timeout=max(0.0, deadline - time.perf_counter()))
        except concurrent.futures.TimeoutError:
            raise TimeoutError from None

    def _cancel(self, handle: Any) -> bool:
        """Withdraw queued work; True if something was still pending."""
        if isinstance(handle, LockstepTicket):
            pending = not handle.done()
            self._lockstep.cancel(handle)  # type: ignore[union-attr]
            return pending
        return handle.cancel()

    @staticmethod
    def _for_consumer(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Order the consuming stream after the encoder's writes (``handover: enqueued``; lockstep results and
        complete ones need nothing) and tie CUDA results to it before any kernel there reads them."""
        cuda = [tensor for tensor in outputs if tensor.is_cuda]
        if isinstance(outputs, Encoded) and cuda:  # the device the results are on, whichever is current
            outputs.wait(torch.cuda.current_stream(cuda[0].device))
        for tensor in cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
        return outputs
