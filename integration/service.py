"""The scheduler-process side: early encoding at arrival, results taken by item hash at prefill.

One :class:`EncoderService` lives in each SGLang scheduler process that serves a supported model.
Every method is called from the scheduler thread. Two backends do the encoding:

* ``async`` (TP=1): a :class:`~mm_scheduler.Coalescer` on its own event loop thread (uvloop when
  installed). Work is handed over with ``asyncio.run_coroutine_threadsafe``; the tower runs on the
  coalescer's forward thread and CUDA stream, overlapping the scheduler and the model's forward.
* ``lockstep`` (TP>1): a :class:`~mm_scheduler.lockstep.LockstepEncoder`. Arrival only queues; the
  prefill forward that needs a result runs the queued batches, in queue order, on the scheduler
  thread and stream, where SGLang runs its own encoder. Every rank sees the same broadcast
  requests and prefills, so every rank issues the same encoder collectives in the same order.

Results are held per ``(modality, item hash)`` until every request that submitted the item has
prefilled past its tokens (chunked prefill may ask several times), finished or aborted; then the
result is freed, and an abort withdraws units still queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client import Counter

from mm_scheduler import Coalescer, CoalescerConfig, CoalescerError, EncodeItem
from mm_scheduler.lockstep import LockstepEncoder, LockstepTicket

from .adapters import SGLangTower

logger = logging.getLogger(__name__)

EntryKey = tuple[str, int]

# Imported only in scheduler processes, after SGLang has set PROMETHEUS_MULTIPROC_DIR.
PREFILL_ITEMS = Counter("mm_coalescer_prefill_items", "Items a prefill asked the encoder for, by where the result came "
                        "from: early (encoded since arrival), on_demand, or fallback (SGLang's own method)",
                        ("coalescer", "source"))


def entry_key(item: Any) -> EntryKey:
    """Results are held under the modality and SGLang's content hash of the item."""
    return (item.modality.name.lower(), item.hash)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An event loop running forever on a daemon thread; the scheduler thread submits coroutines."""

    def __init__(self, name: str) -> None:
        self.loop = _new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass(eq=False)
class _Entry:
    """One submitted item: its pending encode and the requests that still need it."""

    handle: concurrent.futures.Future[list[torch.Tensor]] | LockstepTicket
    nbytes: int
    holders: set[str] = field(default_factory=set)


class EncoderService:
    """Routes an SGLang model's vision encoding through a coalescer (or lockstep encoder)."""

    def __init__(self, tower: SGLangTower, config: CoalescerConfig, *, lockstep: bool,
                 max_held_bytes: int = 1 << 30) -> None:
        self.tower = tower
        self.config = config
        self.lockstep = lockstep
        # Results encoded ahead of their prefill wait on the GPU; under overload (a long waiting
        # queue) they must not grow without bound. Beyond the cap, arrivals encode at prefill.
        self.max_held_bytes = max_held_bytes
        self.held_bytes = 0
        self._entries: dict[EntryKey, _Entry] = {}
        self._held_by: dict[str, set[EntryKey]] = {}
        self._loop: LoopThread | None = None
        self._coalescer: Coalescer | None = None
        self._lockstep: LockstepEncoder | None = None
        self.counts = dict.fromkeys(("submitted", "shared", "deferred", "taken_early", "encoded_on_demand",
                                     "released", "cancelled", "fallbacks"), 0)

    @property
    def mode(self) -> str:
        return "lockstep" if self.lockstep else "async"

    @property
    def budget_bytes(self) -> int:
        return (self._lockstep or self._coalescer).budget_bytes  # type: ignore[union-attr]

    @property
    def bytes_per_patch(self) -> int:
        return (self._lockstep or self._coalescer).bytes_per_patch  # type: ignore[union-attr]

    def start(self) -> EncoderService:
        if self.lockstep:
            self._lockstep = LockstepEncoder(self.tower, self.config)
        else:
            self._loop = LoopThread(f"mm-coalescer-{self.config.name}")
            self._coalescer = Coalescer(self.tower, self.config)
            self._loop.submit(self._coalescer.start()).result()
        return self

    def close(self) -> None:
        """Fail what is still queued and stop the loop thread (tests and orderly shutdown)."""
        if self._coalescer is not None and self._loop is not None:
            self._loop.submit(self._coalescer.aclose(cancel_pending=True)).result(timeout=60)
            self._loop.stop()
        self._entries.clear()
        self._held_by.clear()
        self.held_bytes = 0

    def serves(self, model: object) -> bool:
        return model is self.tower.model

    # --- arrival --------------------------------------------------------------------------------
    def on_arrival(self, rid: str, items: Sequence[Any]) -> None:
        """Submit a new request's items now; identical items already held are shared, not re-encoded."""
        for item in items:
            if item is None or item.hash is None or not self.tower.accepts(item):
                continue
            key = entry_key(item)
            entry = self._entries.get(key)
            if entry is None:
                nbytes = self.tower.output_bytes(item)
                if self.held_bytes + nbytes > self.max_held_bytes:
                    self.counts["deferred"] += 1
                    continue
                handle = self._submit(self.tower.units(item))
                if handle is None:
                    continue
                entry = self._entries[key] = _Entry(handle, nbytes)
                self.held_bytes += nbytes
                self.counts["submitted"] += 1
            elif rid not in entry.holders:
                self.counts["shared"] += 1
            entry.holders.add(rid)
            self._held_by.setdefault(rid, set()).add(key)

    # --- prefill ---------------------------------------------------------------------------------
    def encode(self, items: Sequence[Any], original: Callable[[list[Any]], Any]) -> Any:
        """What the hooked ``get_*_feature`` returns: held results where present, the rest encoded now.

        Items this tower does not take (precomputed embeddings, unknown layouts) and coalescer errors
        fall back to the model's own method for the whole call, so SGLang's behaviour is the floor.
        """
        if not items or not all(self.tower.accepts(item) for item in items):
            self.counts["fallbacks"] += 1
            PREFILL_ITEMS.labels(self.config.name, "fallback").inc(len(items))
            return original(list(items))
        results: list[torch.Tensor | None] = [None] * len(items)
        missing: list[int] = []
        for i, item in enumerate(items):
            entry = self._entries.get(entry_key(item)) if item.hash is not None else None
            if entry is None:
                missing.append(i)
                continue
            try:
                results[i] = self.tower.assemble(item, self._wait(entry.handle))
                self.counts["taken_early"] += 1
                PREFILL_ITEMS.labels(self.config.name, "early").inc()
            except CoalescerError:
                logger.warning("mm-coalescer: early encode of item %s failed; encoding it again", item.hash,
                               exc_info=True)
                missing.append(i)
        if missing:
            try:
                handles = [self._submit(self.tower.units(items[i]), raise_errors=True) for i in missing]
                for i, handle in zip(missing, handles, strict=True):
                    results[i] = self.tower.assemble(items[i], self._wait(handle))
                self.counts["encoded_on_demand"] += len(missing)
                PREFILL_ITEMS.labels(self.config.name, "on_demand").inc(len(missing))
            except CoalescerError:
                logger.warning("mm-coalescer: encoding failed; using the model's own method", exc_info=True)
                self.counts["fallbacks"] += 1
                PREFILL_ITEMS.labels(self.config.name, "fallback").inc(len(items))
                return original(list(items))
        outputs = [self._for_consumer(t) for t in results]  # type: ignore[arg-type]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    # --- release ---------------------------------------------------------------------------------
    def release(self, rid: str, *, aborted: bool) -> None:
        """Drop ``rid``'s hold on its items; free results nobody holds and cancel their queued units."""
        for key in self._held_by.pop(rid, ()):
            self._drop(rid, key, aborted)

    def consumed(self, rid: str, items: Sequence[Any], prefilled_upto: int) -> None:
        """``rid``'s prefill has passed every token of some items: it will not ask for them again.

        Only a retraction (re-prefill) could; it then encodes on demand, as SGLang itself would.
        Freeing here rather than at finish keeps decode-phase requests from filling ``max_held_bytes``.
        """
        held = self._held_by.get(rid)
        if not held:
            return
        for item in items:
            key = entry_key(item)
            if key in held and item.offsets and item.offsets[-1][1] < prefilled_upto:
                held.discard(key)
                self._drop(rid, key, aborted=False)
        if not held:
            del self._held_by[rid]

    def _drop(self, rid: str, key: EntryKey, aborted: bool) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.holders.discard(rid)
        if entry.holders:
            return
        del self._entries[key]
        self.held_bytes -= entry.nbytes
        self.counts["released"] += 1
        if aborted and self._cancel(entry.handle):
            self.counts["cancelled"] += 1

    def stats(self) -> dict[str, Any]:
        """Service counters plus the backend's queue state (for logs, tests and debugging)."""
        backend = (self._coalescer.stats() if self._coalescer is not None
                   else {"pending_units": self._lockstep.pending_units, "forwards": self._lockstep.forwards})
        return {**self.counts, **backend, "held_items": len(self._entries), "held_bytes": self.held_bytes,
                "mode": self.mode}

    def held_keys(self) -> set[EntryKey]:
        return set(self._entries)

    # --- backend plumbing ------------------------------------------------------------------------
    def _submit(self, units: list[EncodeItem], raise_errors: bool = False) -> Any:
        if self._lockstep is not None:
            try:
                return self._lockstep.submit(units)
            except CoalescerError:
                if raise_errors:
                    raise
                logger.warning("mm-coalescer: not encoding an item early", exc_info=True)
                return None
        return self._loop.submit(self._coalescer.encode(units))  # type: ignore[union-attr]

    def _wait(self, handle: Any) -> list[torch.Tensor]:
        if isinstance(handle, LockstepTicket):
            return self._lockstep.result(handle)  # type: ignore[union-attr]
        return handle.result()

    def _cancel(self, handle: Any) -> bool:
        """Withdraw queued work; True if something was still pending."""
        if isinstance(handle, LockstepTicket):
            pending = not handle.done()
            self._lockstep.cancel(handle)  # type: ignore[union-attr]
            return pending
        return handle.cancel()

    @staticmethod
    def _for_consumer(tensor: torch.Tensor) -> torch.Tensor:
        """Tie a CUDA result's memory to the consuming stream before the producer's reference drops."""
        if tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
        return tensor
