"""The soak through :class:`~mm_scheduler_sglang.service.EncoderService`, driven as SGLang 0.5.23 drives it.

``python -m mm_scheduler.soak --driver mm_scheduler_sglang.soak_driver:ServiceDriver`` (``make soak``).

Threads, as in a scheduler process (see :mod:`mm_scheduler_sglang.sglang_plugin` for which hook calls what):

* ONE scheduler thread owns every request and calls the service as the hooks do, per iteration:
  drain the input queue (new request -> ``on_arrival``; abort -> ``release(aborted=True)`` while the
  request waits, its early units queued or running, or decodes), prefill a batch of waiting
  requests (one ``encode(items, original)`` per modality over the whole batch, as
  ``general_mm_embed_routine`` calls ``get_*_feature``; ``original`` is a CPU reference counted as
  the fallback), ``consumed`` after the prefill, a few decode steps, ``release`` at finish, and
  ``sweep(live)`` every few iterations. A few requests vanish after arrival without any release (a
  PD bootstrap failure): only the sweep reclaims them.
* Client threads, each an event loop of many logical clients (SGLang's tokenizer manager), put
  requests and aborts on the scheduler's input queue and wait for the answer.
* The service's own coalescer loop thread and forward thread, with the soak's fault-injecting
  :class:`~mm_scheduler.testing.FakeTower` behind a thin :class:`SGLangTower` adapter.

Every request ends exactly once: with its prefill result (checked against the reference encoding of its
items, whichever way it was produced) or its abort. Beyond the core checks: the coalescer's loop never
blocked > 50 ms, and no ``encode()`` held the scheduler thread longer than ``prefill_wait_s`` plus the
forward deadline plus a margin (minus the time the OS kept that thread on a run queue). In lockstep mode the
forwards run inside ``encode()`` on the scheduler thread, with no deadline: there, ``encode()`` must not hold
the thread more than the margin beyond its own forwards (a wait on a lock or on another thread would). The
soak's own event loop runs none of the service (clients have their own threads): its lateness measures only
contention for the GIL and the CPU (in lockstep, with the scheduler thread's forwards), so it is reported,
not checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from mm_scheduler_sglang.adapters import SGLangTower
from mm_scheduler_sglang.service import EncoderService
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

from mm_scheduler import CoalescerConfig, EncodeItem
from mm_scheduler.soak import (
    BYTES_PER_PATCH,
    MAX_BLOCKED_MS,
    Ledger,
    LoopLagProbe,
    RequestSpec,
    SoakSettings,
    _cancelled_while_running,
    _runqueue_wait_s,
)
from mm_scheduler.testing import FakeTower, expected_encoding

PREFILL_BATCH = 4
LM_FORWARD_S = 0.002
"""What one scheduler iteration spends in the language model's forward (requests wait meanwhile)."""
SWEEP_EVERY = 50
"""Scheduler iterations between sweeps (the plugin sweeps about once a second)."""
VANISH_EVERY = 397
"""One request in this many (fault-free ones) vanishes after arrival: no release hook ever runs for it."""
BLOCK_MARGIN_S = 0.5
WEDGED_S = 20.0
"""A scheduler thread inside one ``encode()`` this long is wedged: the watchdog ends the hang to finish the run."""
CLIENT_THREADS = 4


def item_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def to_sglang_item(item: EncodeItem, start: int) -> MultimodalDataItem:
    """The soak item as the SGLang item a processor would have made (its key decides its hash)."""
    modality = Modality.VIDEO if item.modality == "video" else Modality.IMAGE
    rows = item.num_patches * (item.pixel_values.shape[0] if item.modality == "video" else 1)
    return MultimodalDataItem(modality=modality, hash=None if item.key is None else item_hash(item.key),
                              offsets=[(start, start + rows - 1)], feature=item.pixel_values,
                              model_specific_data={"soak_key": item.key, "patches": item.num_patches})


def reference(mm_items: Sequence[MultimodalDataItem]) -> torch.Tensor:
    """What the model's own ``get_*_feature`` returns for these items (the soak's CPU reference)."""
    return torch.cat([expected_encoding(_soak_item(i)) for i in mm_items], dim=0)


def _soak_item(mm_item: MultimodalDataItem) -> EncodeItem:
    modality = "video" if mm_item.modality == Modality.VIDEO else "image"
    return EncodeItem(mm_item.feature, mm_item.model_specific_data["patches"], modality,
                      key=mm_item.model_specific_data["soak_key"])


class FaultyTower(SGLangTower):
    """A CPU SGLang tower adapter over the soak's :class:`FakeTower` (its faults, its pure outputs)."""

    ragged = False
    bytes_per_patch = BYTES_PER_PATCH

    def __init__(self, fake: FakeTower) -> None:
        self.fake = fake
        self.model = object()
        self.device = torch.device("cpu")
        self.forward_s_by_thread: dict[int, float] = {}
        """Seconds spent in forwards, by thread (lockstep runs them on the scheduler thread)."""

    def _raw_pixels(self, item: Any, shape: torch.Size) -> bool:
        return "patches" in item.model_specific_data

    def result_key(self, item: Any) -> Hashable | None:
        return None if item.hash is None else (item.modality.name.lower(), item.hash)

    def output_tokens(self, item: Any) -> int:
        return item.offsets[-1][1] - item.offsets[0][0] + 1

    def output_bytes(self, item: Any) -> int:
        return self.output_tokens(item) * BYTES_PER_PATCH

    def units(self, item: Any) -> list[EncodeItem]:
        return [_soak_item(item)]

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        started = time.perf_counter()
        try:
            return self.fake.forward(units)
        finally:
            thread = threading.get_ident()
            self.forward_s_by_thread[thread] = self.forward_s_by_thread.get(thread, 0.0) + time.perf_counter() - started


class _Request:
    __slots__ = ("decode_left", "items", "mm_items", "reply", "spec")

    def __init__(self, spec: RequestSpec, items: list[EncodeItem], reply: Callable[[str], None]) -> None:
        self.spec = spec
        self.items = items
        start = 0
        self.mm_items = []
        for item in items:
            self.mm_items.append(to_sglang_item(item, start))
            start = self.mm_items[-1].offsets[-1][1] + 1
        self.reply = reply
        self.decode_left = 1 + spec.rid % 4

    @property
    def rid(self) -> str:
        return f"req-{self.spec.rid}"


class SchedulerThread:
    """What SGLang's scheduler thread does with the service's hooks, in the same order, on one thread."""

    def __init__(self, service: EncoderService, ledger: Ledger, settings: SoakSettings) -> None:
        self.service = service
        self.ledger = ledger
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.waiting: dict[str, _Request] = {}
        self.running: dict[str, _Request] = {}
        # Lockstep: forwards run inside encode() (no deadline) and are not counted as blocking; the rest must
        # stay within the margin. Async: the wait bound, then a hung forward's deadline, then the margin.
        self.bound_s = BLOCK_MARGIN_S if service.lockstep else (
            service.prefill_wait_s + float(settings.forward_timeout_s) + BLOCK_MARGIN_S)
        self.figures = dict.fromkeys(("iterations", "prefill_batches", "encode_calls", "aborted_waiting",
                                      "aborted_decoding", "aborts_too_late", "vanished", "fallback_requests"), 0)
        self.max_block_ms = 0.0
        self.in_encode_since: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-scheduler", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not (self.stop.is_set() and not self.waiting and not self.running):
                self.figures["iterations"] += 1
                self._recv(block=not self.waiting and not self.running)
                self._prefill()
                self._decode()
                if self.waiting or self.running:
                    time.sleep(LM_FORWARD_S)
                if self.figures["iterations"] % SWEEP_EVERY == 0:
                    self.service.sweep(self.waiting.keys() | self.running.keys())
            for _ in range(2):  # requests that vanished late: two sweeps running, as the plugin's timer would
                self.service.sweep(())
        except BaseException as exc:  # a harness bug or an escaped error: the run reports it
            self.error = exc

    def _recv(self, block: bool) -> None:
        try:
            messages = [self.inbox.get(timeout=0.005) if block else self.inbox.get_nowait()]
        except queue.Empty:
            return
        with contextlib.suppress(queue.Empty):
            while True:
                messages.append(self.inbox.get_nowait())
        for kind, payload in messages:
            if kind == "req":
                self._arrive(payload)
            else:
                self._abort(payload)

    def _arrive(self, req: _Request) -> None:
        self.service.on_arrival(req.rid, req.mm_items)  # Scheduler._add_request_to_queue
        spec = req.spec
        if spec.rid % VANISH_EVERY == 13 and not spec.faults and not spec.cancelled_on_purpose:
            self.figures["vanished"] += 1  # PD bootstrap failed: dropped with no release hook
            self.ledger.record(spec, "vanished")
            req.reply("vanished")
            return
        self.waiting[req.rid] = req

    def _abort(self, rid: str) -> None:
        req = self.waiting.pop(rid, None)
        if req is not None:  # Req.release_mm_inputs_on_abort: its early units may be queued or running
            self.service.release(rid, aborted=True)
            self.figures["aborted_waiting"] += 1
            self.ledger.record(req.spec, "cancelled")
            req.reply("cancelled")
            return
        req = self.running.pop(rid, None)
        if req is not None:  # aborted while decoding: its prefill result was already delivered
            self.service.release(rid, aborted=True)
            self.figures["aborted_decoding"] += 1
        else:
            self.figures["aborts_too_late"] += 1

    def _prefill(self) -> None:
        if not self.waiting:
            return
        batch = [self.waiting.pop(rid) for rid in list(self.waiting)[:PREFILL_BATCH]]
        self.figures["prefill_batches"] += 1
        results: dict[str, list[torch.Tensor | None]] = {r.rid: [None] * len(r.mm_items) for r in batch}
        fell_back: set[str] = set()
        for modality in (Modality.IMAGE, Modality.VIDEO):
            where = [(r, i) for r in batch for i, item in enumerate(r.mm_items) if item.modality == modality]
            if not where:
                continue
            items = [r.mm_items[i] for r, i in where]
            used_original = []

            def original(subset: list[Any], _used: list[bool] = used_original) -> torch.Tensor:
                _used.append(True)
                return reference(subset)

            out = self._timed_encode(items, original)
            if used_original:
                fell_back.update(r.rid for r, _ in where)
            rows = 0
            for r, i in where:
                n = r.mm_items[i].offsets[-1][1] - r.mm_items[i].offsets[0][0] + 1
                results[r.rid][i] = out[rows:rows + n]
                rows += n
            if rows != out.shape[0]:
                raise AssertionError(f"encode returned {out.shape[0]} rows for {rows}")
        for r in batch:
            outs = results[r.rid]
            expected = [expected_encoding(item) for item in r.items]
            if all(o is not None and torch.equal(o, e) for o, e in zip(outs, expected, strict=True)):
                self.ledger.record(r.spec, "ok")
            else:
                self.ledger.record(r.spec, "wrong", "a prefill result differs from the reference encoding")
            self.figures["fallback_requests"] += r.rid in fell_back
            self.ledger.items += len(r.items)
            upto = r.mm_items[-1].offsets[-1][1] + 1
            self.service.consumed(r.rid, r.mm_items, upto)  # Scheduler.run_batch (after)
            r.reply("prefilled")
            self.running[r.rid] = r

    def _timed_encode(self, items: list[Any], original: Callable[[list[Any]], Any]) -> torch.Tensor:
        inside_original = 0.0

        def timed_original(subset: list[Any]) -> Any:
            nonlocal inside_original
            t0 = time.perf_counter()
            try:
                return original(subset)
            finally:
                inside_original += time.perf_counter() - t0

        self.figures["encode_calls"] += 1
        forwards = getattr(self.service.tower, "forward_s_by_thread", {})
        thread = threading.get_ident()
        queued, in_forwards = _runqueue_wait_s(), forwards.get(thread, 0.0)
        self.in_encode_since = started = time.perf_counter()
        try:
            out = self.service.encode(items, timed_original)  # the hooked get_*_feature
        finally:
            self.in_encode_since = None
        blocked = (time.perf_counter() - started - inside_original - (_runqueue_wait_s() - queued)
                   - (forwards.get(thread, 0.0) - in_forwards))
        self.max_block_ms = max(self.max_block_ms, blocked * 1000)
        return out

    def _decode(self) -> None:
        for rid in list(self.running):
            req = self.running[rid]
            req.decode_left -= 1
            if req.decode_left <= 0:
                del self.running[rid]
                self.service.release(rid)  # Scheduler._maybe_clear_mm_inputs at finish


class ServiceDriver:
    """EncoderService (async mode) called from one scheduler thread, fed by client threads."""

    name = "service-async"
    lockstep = False
    runs_on_soak_loop = False  # the service runs on the scheduler, coalescer-loop and forward threads

    async def run(self, specs: Sequence[RequestSpec], tower: FakeTower, settings: SoakSettings,
                  ledger: Ledger) -> dict[str, Any]:
        config = CoalescerConfig(max_wait_ms=1.0, max_batch_items=48, budget_bytes=settings.budget_patches *
                                 BYTES_PER_PATCH, bytes_per_patch=BYTES_PER_PATCH, max_queue_patches=10_000_000,
                                 forward_timeout_s=settings.forward_timeout_s, name=f"soak-svc-{settings.seed}")
        service = EncoderService(FaultyTower(tower), config, lockstep=self.lockstep,
                                 max_held_bytes=2 << 20, prefill_wait_s=0.5).start()
        scheduler = SchedulerThread(service, ledger, settings)
        probe = LoopLagProbe()
        probe_done = None if service._loop is None else service._loop.submit(probe.run())
        own_keys: dict[Hashable, str] = {}
        cancelled_keys: list[list[str]] = []

        def on_forward(record: Any) -> None:  # the forward thread: abort the owners of this batch's units
            for key in record.keys:
                base = key[0] if isinstance(key, tuple) else key
                rid = own_keys.pop(base, None)
                if rid is not None:
                    scheduler.inbox.put(("abort", rid))

        tower.on_forward = on_forward
        feed = deque(specs)
        feed_lock = threading.Lock()

        def next_spec() -> RequestSpec | None:
            with feed_lock:
                return feed.popleft() if feed else None

        async def client(rng_seed: int) -> None:
            import random

            rng = random.Random(rng_seed)
            loop = asyncio.get_running_loop()
            think_s = settings.clients / settings.target_rate
            while (spec := next_spec()) is not None:
                await asyncio.sleep(rng.uniform(0, 2 * think_s))
                items = spec.make_items()
                answered: asyncio.Future[str] = loop.create_future()
                req = _Request(spec, items, lambda outcome, f=answered: loop.call_soon_threadsafe(
                    _set_once, f, outcome))
                if spec.cancel_when_running:
                    for key in spec.own_keys(items):
                        own_keys[key] = req.rid
                scheduler.inbox.put(("req", req))
                handle = None
                if spec.cancel_after is not None:
                    handle = loop.call_later(spec.cancel_after, scheduler.inbox.put, ("abort", req.rid))
                outcome = await answered
                if handle is not None:
                    handle.cancel()
                if outcome == "cancelled":
                    cancelled_keys.append(spec.own_keys(items))
                for key in spec.own_keys(items):
                    own_keys.pop(key, None)
                del items, req

        def client_thread(index: int) -> None:
            async def clients() -> None:
                share = range(index, settings.clients, CLIENT_THREADS)
                await asyncio.gather(*(client(settings.seed * 100_003 + n) for n in share))

            asyncio.run(clients())

        scheduler.thread.start()
        threads = [threading.Thread(target=client_thread, args=(n,), name=f"soak-clients-{n}", daemon=True)
                   for n in range(CLIENT_THREADS)]
        for thread in threads:
            thread.start()
        wedged = await asyncio.to_thread(self._watch, scheduler, threads, tower, settings)
        scheduler.stop.set()
        await asyncio.to_thread(scheduler.thread.join, 60)
        if scheduler.error is not None:
            raise scheduler.error
        stats = service.stats()
        if tower.hung_forwards and not self.lockstep:  # let the health probe recover before the figures
            deadline = time.monotonic() + 10 * settings.forward_timeout_s + 5
            while not stats["healthy"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                stats = service.stats()
        tower.release()
        if probe_done is not None:
            probe.stop()
            await asyncio.wrap_future(probe_done)
        for _ in range(500):  # withdrawn or abandoned work leaves the coalescer's queue asynchronously
            if service.stats()["pending_units"] == 0:
                break
            await asyncio.sleep(0.01)
        after = service.stats()
        service.close()
        counts = service.counts
        figures = {
            "fallback_calls": counts["fallbacks"], "fallback_requests": scheduler.figures["fallback_requests"],
            "early_items": counts["taken_early"], "on_demand_items": counts["encoded_on_demand"],
            "shared_items": counts["shared"], "deferred_items": counts["deferred"], "admitted": counts["admitted"],
            "wait_timeouts": counts["wait_timeouts"], "withdrawn": counts["cancelled"], "swept": counts["swept"],
            **scheduler.figures,
            "max_scheduler_block_ms": round(scheduler.max_block_ms, 1),
            "scheduler_block_bound_ms": round(scheduler.bound_s * 1000),
            "coalescer_loop_max_lag_ms": round(probe.max_lag_ms, 1),
            "coalescer_loop_max_blocked_ms": round(probe.max_blocked_ms, 1),
            "wedged": wedged,
        }
        checks = {
            "scheduler thread not wedged": not wedged,
            "vanished requests swept": counts["swept"] >= 1 or scheduler.figures["vanished"] == 0,
        }
        what = "beyond its own forwards " if self.lockstep else ""
        checks[f"one encode() blocked the scheduler {what}<= {scheduler.bound_s * 1000:.0f} ms"] = (
            scheduler.max_block_ms <= scheduler.bound_s * 1000)
        if not self.lockstep:  # lockstep has no coalescer loop
            loop_thread = service._loop.thread.name if service._loop is not None else None
            checks["no forward ran on the coalescer loop's thread"] = all(r.thread != loop_thread for r in tower.log)
            checks[f"coalescer loop never blocked > {MAX_BLOCKED_MS:g} ms"] = probe.max_blocked_ms <= MAX_BLOCKED_MS
        return {
            "stats": stats,
            "cancelled_while_running": _cancelled_while_running(cancelled_keys, tower),
            "leftovers": {"held_bytes": after["held_bytes"], "held_items": after["held_items"],
                          "deferred_items": after["deferred_items"], "pending_units": after["pending_units"],
                          "waiting": len(scheduler.waiting), "running": len(scheduler.running)},
            "figures": figures,
            "checks": checks,
        }

    @staticmethod
    def _watch(scheduler: SchedulerThread, threads: list[threading.Thread], tower: FakeTower,
               settings: SoakSettings) -> bool:
        """Wait for the clients; if one ``encode()`` holds the scheduler thread for good, end the hang."""
        deadline = time.monotonic() + settings.deadline_s
        wedged = False
        for thread in threads:
            while thread.is_alive() and scheduler.thread.is_alive() and time.monotonic() < deadline:
                thread.join(0.1)
                since = scheduler.in_encode_since
                if since is not None and time.perf_counter() - since > WEDGED_S and not wedged:
                    wedged = True
                    scheduler.max_block_ms = max(scheduler.max_block_ms, (time.perf_counter() - since) * 1000)
                    tower.release()
        return wedged


class LockstepServiceDriver(ServiceDriver):
    """The same, with the lockstep backend (TP>1): forwards run inside ``encode()`` on the scheduler thread.

    A forward there has no deadline (a hang would hold the scheduler, as SGLang's own encoder would),
    so run it with ``hang_at=None``.
    """

    name = "service-lockstep"
    lockstep = True


def _set_once(future: asyncio.Future[str], outcome: str) -> None:
    if not future.done():
        future.set_result(outcome)
