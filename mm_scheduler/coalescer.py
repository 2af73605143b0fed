"""The asyncio coalescer: requests in, batched forwards out, results back in each request's order.

Life of a request: ``encode(items)`` validates every item (nothing is enqueued if one is bad),
splits videos into frame units, joins units whose ``key`` is already queued or running (dedup),
queues the rest in the planner and awaits one future. The dispatcher task asks the planner for a
batch whenever the forward thread is free (eager policy: a lone request runs at once) and hands it
to the executor; when the batch's outputs are ready each unit's output goes to every request that
waits for it, and a request whose last unit arrived resolves. Cancellation and failures detach a
request from its units; a queued unit nobody waits for any more is withdrawn before it runs.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from . import metrics
from .config import CoalescerConfig
from .errors import (
    CoalescerClosedError,
    CoalescerError,
    EncodeError,
    ForwardTimeoutError,
    QueueFullError,
    TowerUnhealthyError,
)
from .executor import BatchOutcome, Executor, deliverable_at_launch, join
from .health import ForwardSupervisor
from .jobs import Job, Request
from .planner import Planner
from .types import Encoded, EncodeItem, Tower
from .units import (
    check_items,
    record_ready_events,
    resolve_budget_bytes,
    resolve_bytes_per_patch,
    resolve_device,
    split_into_units,
    unit_error,
)

logger = logging.getLogger(__name__)


class Coalescer:
    """Coalesces encode work of concurrent requests into budgeted, batched tower forwards.

    Use as ``async with Coalescer(tower, config) as co: outs = await co.encode(items)``. All
    methods except :meth:`stats` must be called from the event loop the coalescer was started on.
    """

    _sync_lone_inline = True
    """A lone batch's forward thread waits for its completion event itself (see ``ForwardSupervisor._run``)."""

    def __init__(self, tower: Tower, config: CoalescerConfig | None = None) -> None:
        self.tower = tower
        self.config = config or CoalescerConfig()
        self.device = resolve_device(self.config, tower)
        self.bytes_per_patch = resolve_bytes_per_patch(self.config, tower, self.device)
        self.budget_bytes = resolve_budget_bytes(self.config, self.device)
        self._planner = Planner(ragged=tower.ragged, bytes_per_patch=self.bytes_per_patch,
                                budget_bytes=self.budget_bytes, max_batch_items=self.config.max_batch_items,
                                oom_backoff=self.config.oom_backoff)
        self._executor = Executor(tower, self.device, dedicated_stream=self.config.stream == "dedicated")
        self._validate_item = getattr(tower, "validate", None)
        self._max_wait_s = self.config.max_wait_ms / 1000.0
        self._jobs_by_key: dict[Hashable, Job] = {}
        # Keys expedited before their units were queued (another thread's submit still in flight).
        self._wanted: dict[Hashable, None] = {}
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._space_freed: asyncio.Condition | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._launching = False  # a batch was handed to the forward thread, which has not returned it yet
        self._closing = False
        self._closed = False
        self._supervisor = ForwardSupervisor(
            self._executor, self.config.name, self.config.forward_timeout_s, self.config.max_inflight_batches,
            on_thread_free=self._thread_free, on_unhealthy=self._tower_hung, on_healthy=self._wake,
            closing=lambda: self._closing)
        self._counts = dict.fromkeys(
            ("requests", "units", "forwards", "forward_patches", "max_forward_patches", "dedup_hits",
             "failed_units", "oom_backoffs", "cancelled_requests", "rejected_requests", "expedited_units"), 0)
        self._labels = {"coalescer": self.config.name}
        self._m_units = metrics.UNITS.labels(**self._labels)
        self._m_queue = metrics.QUEUE_PATCHES.labels(**self._labels)
        self._m_ok = metrics.REQUESTS.labels(outcome="ok", **self._labels)

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> Coalescer:
        """Bind to the running loop and start the dispatcher; ``async with`` calls this."""
        if self._loop is not None:
            raise RuntimeError("Coalescer already started")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._space_freed = asyncio.Condition()
        self._supervisor.start(self._loop)
        self._dispatcher = self._loop.create_task(self._dispatch_loop(), name=f"mm-dispatch-{self.config.name}")
        return self

    async def __aenter__(self) -> Coalescer:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # The block failed: fail queued work at once instead of draining it for a caller that is gone.
        await self.aclose(cancel_pending=exc_type is not None)

    async def aclose(self, cancel_pending: bool = False) -> None:
        """Stop accepting work; finish what is queued (or fail it with CoalescerClosedError).

        Batches already running always finish and deliver. When this returns no future is pending.
        """
        if self._closed:
            return
        self._closing = True
        if cancel_pending:
            self._fail_queued(CoalescerClosedError("coalescer closed before this unit was encoded"))
        if self._dispatcher is not None:
            self._wakeup.set()
            await self._dispatcher
            if self._batches:
                await asyncio.gather(*self._batches)  # each ends within the forward deadline, if one is set
            await self._supervisor.aclose()
            async with self._space_freed:
                self._space_freed.notify_all()
        self._closed = True

    # --- the public call ---------------------------------------------------------------------
    async def encode(self, items: Sequence[EncodeItem], *, urgent: bool = False) -> Encoded:
        """Encode ``items``; returns one tensor per item, in the order given (with ``handover: enqueued``, CUDA
        results may still be being written: see :class:`Encoded`).

        ``urgent``: the caller is blocked on the result (a prefill needs it now): its units are
        dispatched before anything else queued (see :meth:`expedite`).

        Raises InvalidItemError (bad input, nothing enqueued), QueueFullError (backpressure),
        EncodeError (the tower failed on one of these items) or CoalescerClosedError.
        """
        if self._closing or self._loop is None:
            raise CoalescerClosedError("coalescer is closed" if self._closing else "coalescer not started")
        if not self._supervisor.healthy:
            raise self._refuse_unhealthy()
        check_items(items, self._planner, self._validate_item, self._count_invalid)
        record_ready_events(items)
        units, spans = split_into_units(items)
        if not units:
            return Encoded()
        request = await self._enqueue(units, urgent)
        await self._outputs_of(request)
        try:
            results, events = join(request.outputs, spans, self._executor.join_stream, request.events)  # type: ignore[arg-type]
            if events and self.config.handover == "complete":  # a join, which the promise covers too
                await self._supervisor.completed(events[-1])
                events = ()
        except EncodeError:
            self._counts["failed_units"] += 1
            metrics.ERRORS.labels(kind="encode", **self._labels).inc()
            metrics.REQUESTS.labels(outcome="failed", **self._labels).inc()
            raise
        self._m_ok.inc()
        encoded = Encoded(results)
        encoded.events = events
        return encoded

    def expedite(self, keys: Sequence[Hashable]) -> int:
        """Someone is blocked on the units queued under ``keys``: dispatch them next.

        Returns how many were still queued (running or finished ones need nothing). Keys are the
        dedup keys of :class:`EncodeItem` (video frames: ``(key, frame)``), so this needs ``dedup``.
        A key not queued yet is remembered (the 4096 latest): a submit from another thread may reach
        the loop after this call, and its units are then expedited as they are queued.
        """
        jobs = []
        for key in keys:
            job = self._jobs_by_key.get(key)
            if job is None:
                self._wanted[key] = None
                if len(self._wanted) > 4096:
                    del self._wanted[next(iter(self._wanted))]
            elif not job.running:
                jobs.append(job)
        if jobs:
            self._expedite(jobs)
            self._wakeup.set()
        return len(jobs)

    def _expedite(self, jobs: list[Job]) -> None:
        self._planner.expedite(jobs)
        self._counts["expedited_units"] += len(jobs)

    def stats(self) -> dict[str, Any]:
        """A snapshot of counters and queue state (cheap; safe to call from any thread)."""
        counts = {**self._counts, **self._supervisor.counts}
        forwards = counts["forwards"]
        return {
            **counts,
            "mean_patches_per_forward": counts["forward_patches"] / forwards if forwards else 0.0,
            "pending_units": self._planner.pending_units,
            "pending_patches": self._planner.pending_patches,
            "inflight_batches": len(self._batches),
            "budget_bytes": self.budget_bytes,
            "bytes_per_patch": self.bytes_per_patch,
            "budget_patches": self._planner.budget_patches,
            "device": str(self.device),
            "closed": self._closing,
            "healthy": self._supervisor.healthy,
            "forward_deadline_s": self._supervisor.deadline.seconds,
            "stuck_threads": self._supervisor.stuck_threads,
        }

    # --- submit side -------------------------------------------------------------------------
    def _count_invalid(self) -> None:
        self._count_rejected("invalid_item")

    def _count_rejected(self, kind: str) -> None:
        self._counts["rejected_requests"] += 1
        metrics.ERRORS.labels(kind=kind, **self._labels).inc()

    def _refuse_unhealthy(self) -> TowerUnhealthyError:
        self._count_rejected("unhealthy")
        return self._supervisor.error()

    async def _enqueue(self, units: list[EncodeItem], urgent: bool) -> Request:
        """Admit ``units`` (backpressure), queue them or join identical work, and wake the dispatcher."""
        patches = sum(u.num_patches for u in units)
        if self._planner.pending_patches + patches > self.config.max_queue_patches:
            await self._admit(patches)
            if not self._supervisor.healthy:
                raise self._refuse_unhealthy()
        request = Request(next(self._seq), self._loop.create_future(), len(units))
        self._attach(request, units, self._loop.time())
        if urgent:
            self._expedite([job for job in request.jobs if not job.running])
        self._counts["requests"] += 1
        self._counts["units"] += len(units)
        self._m_units.inc(len(units))
        self._m_queue.set(self._planner.pending_patches)
        self._wakeup.set()
        return request

    async def _outputs_of(self, request: Request) -> None:
        """Wait until every unit of ``request`` was delivered; a cancelled caller withdraws its units."""
        try:
            await request.future
        except asyncio.CancelledError:
            self._counts["cancelled_requests"] += 1
            metrics.REQUESTS.labels(outcome="cancelled", **self._labels).inc()
            self._detach(request)
            raise
        except BaseException:
            metrics.REQUESTS.labels(outcome="failed", **self._labels).inc()
            raise

    async def _admit(self, patches: int) -> None:
        """Backpressure (the queue would exceed ``max_queue_patches``): reject, or wait for space."""
        limit = self.config.max_queue_patches
        if self.config.queue_full == "reject" or patches > limit:
            self._count_rejected("queue_full")
            raise QueueFullError(f"queue holds {self._planner.pending_patches} patches; this request adds "
                                 f"{patches} and max_queue_patches is {limit}")
        async with self._space_freed:
            await self._space_freed.wait_for(
                lambda: self._closing or self._planner.pending_patches + patches <= limit)
        if self._closing:
            raise CoalescerClosedError("coalescer closed while this request waited for queue space")

    def _attach(self, request: Request, units: list[EncodeItem], now: float) -> None:
        """Queue each unit, or join identical work already queued or running (hot path: kept flat)."""
        jobs_by_key = self._jobs_by_key if self.config.dedup else None
        new_jobs: list[Job] = []
        request_jobs = request.jobs
        for slot, unit in enumerate(units):
            key = unit.key if jobs_by_key is not None else None
            job = jobs_by_key.get(key) if key is not None else None
            if job is None:
                job = Job(unit, key, now, request, slot)
                new_jobs.append(job)
                if key is not None:
                    jobs_by_key[key] = job
            else:
                job.add_waiter(request, slot)
            request_jobs.append(job)
        self._planner.add(new_jobs)
        if self._wanted:
            urgent = [job for job in new_jobs if job.key in self._wanted]
            for job in urgent:
                del self._wanted[job.key]
            if urgent:
                self._expedite(urgent)
        hits = len(units) - len(new_jobs)
        if hits:
            self._counts["dedup_hits"] += hits
            metrics.DEDUP_HITS.labels(**self._labels).inc(hits)

    def _detach(self, request: Request) -> None:
        """Stop delivering to ``request``; withdraw queued units that nobody else waits for."""
        for job in request.jobs:
            job.remove_waiter(request)
            if not job.running and not job.has_waiters():
                self._planner.discard(job)
                self._forget(job)
        request.jobs = []
        self._queue_changed()

    def _forget(self, job: Job) -> None:
        if job.key is not None and self._jobs_by_key.get(job.key) is job:
            del self._jobs_by_key[job.key]

    def _fail(self, request: Request, error: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(error)
        self._detach(request)

    def _queue_changed(self) -> None:
        self._m_queue.set(self._planner.pending_patches)
        if self.config.queue_full == "wait" and self._space_freed is not None:
            self._loop.create_task(self._notify_space())

    async def _notify_space(self) -> None:
        async with self._space_freed:
            self._space_freed.notify_all()

    # --- dispatch side -----------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        """Form a batch whenever the forward thread is free and a batch is due; exit once drained.

        Should this loop ever fail, the coalescer closes and fails what is queued rather than leave
        callers waiting forever.
        """
        try:
            await self._dispatch_until_drained()
        except Exception:
            logger.exception("coalescer %s: dispatcher failed; closing", self.config.name)
            self._closing = True
            self._fail_queued(CoalescerClosedError("coalescer dispatcher failed; see the log"))

    def _fail_queued(self, error: CoalescerError) -> None:
        """Fail every queued request; each gets its own copy (one shared instance would collect every
        raising task's traceback frames)."""
        for job in list(self._planner):
            for request, _ in job.waiters():
                self._fail(request, type(error)(*error.args))

    async def _dispatch_until_drained(self) -> None:
        max_inflight = self.config.max_inflight_batches
        window = self.config.dispatch == "window"
        while True:
            if self._closing and not self._planner.pending_units:
                return
            if not self._supervisor.healthy and self._planner.pending_units:
                self._fail_queued(TowerUnhealthyError("the tower is unhealthy (a forward hung); not encoding"))
                continue
            timeout = None
            if self._planner.pending_units and not self._launching and len(self._batches) < max_inflight:
                now = self._loop.time()
                batch: list[Job] | None = self._planner.next_batch(  # type: ignore[assignment]
                    now, self._max_wait_s, only_ready=window and not self._closing)
                if batch is not None:
                    self._launch(batch)
                    continue
                timeout = self._planner.next_deadline(self._max_wait_s) - now
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass

    def _launch(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.running = True
        self._launching = True
        self._queue_changed()
        task = self._loop.create_task(self._run_batch(jobs, jobs[0].arrival))
        self._batches.add(task)

    async def _run_batch(self, jobs: list[Job], oldest_arrival: float) -> None:
        metrics.QUEUE_WAIT.labels(**self._labels).observe(self._loop.time() - oldest_arrival)
        # time.monotonic, not the loop's clock: uvloop's counts whole milliseconds, and a batch's dispatch-to-result
        # time is read beside its launch time, which the forward thread measures with time.monotonic.
        started = time.monotonic()
        # Lone batch (nothing queued, nothing else in flight): the forward thread also waits for the GPU;
        # with work queued it returns at once, to pipeline.
        # With handover: enqueued nobody waits for the GPU here: results go out once the forward is queued.
        enqueued = self.config.handover == "enqueued"
        lone = (not enqueued and self._sync_lone_inline and not self._planner.pending_units
                and len(self._batches) <= 1)
        delivered_at_launch = False

        def launched(outcome: BatchOutcome) -> None:
            nonlocal delivered_at_launch
            if deliverable_at_launch(outcome):
                self._deliver(jobs, outcome, ready=outcome.done)
                delivered_at_launch = True

        try:
            outcome = await self._supervisor.run([job.unit for job in jobs], lone, launched if enqueued else None)
        except BaseException as exc:  # the executor itself broke: fail this batch's units, keep serving
            logger.exception("coalescer %s: batch of %d units failed outside the tower", self.config.name, len(jobs))
            outcome = BatchOutcome(outputs=[exc] * len(jobs))
        self._launching = False
        self._record(jobs, outcome, time.monotonic() - started)
        if not delivered_at_launch:  # else a later failure (a completion past the deadline) reaches nobody
            self._deliver(jobs, outcome)
        # Free the slot before waking the dispatcher (a done-callback would run only after it looked).
        self._batches.discard(asyncio.current_task())  # type: ignore[arg-type]
        self._wakeup.set()

    # --- what the supervisor tells ------------------------------------------------------------
    def _thread_free(self) -> None:
        """The forward thread returned its batch: the dispatcher may form the next one."""
        self._launching = False
        self._wakeup.set()

    def _tower_hung(self) -> None:
        """A forward hung and the tower turned unhealthy: queued work would wait behind it; fail it now."""
        self._fail_queued(self._supervisor.error())
        self._queue_changed()

    def _wake(self) -> None:
        self._wakeup.set()

    # --- results -----------------------------------------------------------------------------
    def _record(self, jobs: list[Job], outcome: BatchOutcome, seconds: float) -> None:
        bucket = self._planner.bucket_of(jobs[0].unit.num_patches)
        budget = self._planner.bucket_budget_patches(bucket)
        for patches in outcome.forward_sizes:
            self._counts["forwards"] += 1
            self._counts["forward_patches"] += patches
            self._counts["max_forward_patches"] = max(self._counts["max_forward_patches"], patches)
            metrics.FORWARDS.labels(**self._labels).inc()
            metrics.PATCHES_PER_FORWARD.labels(**self._labels).observe(patches)
        metrics.UNITS_PER_FORWARD.labels(**self._labels).observe(len(jobs))
        metrics.BUDGET_FILL.labels(**self._labels).observe(sum(j.unit.num_patches for j in jobs) / budget)
        metrics.BATCH_SECONDS.labels(**self._labels).observe(seconds)
        metrics.BATCH_LAUNCH_SECONDS.labels(**self._labels).observe(outcome.launch_seconds)
        gpu_seconds = outcome.gpu_seconds()  # the supervisor returns a CUDA outcome once its events completed
        if gpu_seconds is not None:
            metrics.BATCH_GPU_SECONDS.labels(**self._labels).observe(gpu_seconds)
        for failed in outcome.oom_patches:
            new_budget = self._planner.shrink_budget(bucket, failed)
            self._counts["oom_backoffs"] += 1
            metrics.OOM_BACKOFFS.labels(**self._labels).inc()
            logger.warning("coalescer %s: out of memory on a %d-patch forward; bucket %d budget now %d patches",
                           self.config.name, failed, bucket, new_budget)

    def _deliver(self, jobs: list[Job], outcome: BatchOutcome, ready: torch.cuda.Event | None = None) -> None:
        """Hand each output to its waiters; requests finished by this batch resolve in arrival order.

        ``ready``: the outputs are still being written on the GPU; their consumers must wait for it."""
        finished: list[Request] = []
        for job, output in zip(jobs, outcome.outputs, strict=True):
            if job.key is not None:
                self._forget(job)
            waiters = job.waiters()
            job.request, job.more_waiters = None, None
            if not isinstance(output, torch.Tensor):  # an exception, or garbage the tower returned
                self._counts["failed_units"] += 1
                kind = {ForwardTimeoutError: "forward_timeout", TowerUnhealthyError: "unhealthy"}.get(
                    type(output), "encode")
                metrics.ERRORS.labels(kind=kind, **self._labels).inc()
                for request, _ in waiters:
                    self._fail(request, unit_error(job.unit, output))
                continue
            for request, slot in waiters:
                request.outputs[slot] = output
                request.remaining -= 1
                if ready is not None and ready not in request.events:
                    request.events.append(ready)
                if request.remaining == 0:
                    finished.append(request)
        finished.sort(key=lambda r: r.seq)
        for request in finished:
            if not request.future.done():
                request.future.set_result(None)
