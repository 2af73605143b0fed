"""Deterministic encoder for tensor parallelism: batches are a pure function of the submit sequence.

Why it exists: with TP>1 every rank runs its shard of the vision tower, and the tower's collectives
only line up if every rank issues the same forwards, with the same shapes, in the same order. The
asyncio :class:`~mm_scheduler.Coalescer` cuts batches by a clock on its own thread, so two ranks can
cut different batches, or interleave encoder collectives with the model's differently, and hang.

:class:`LockstepEncoder` has no clock, no thread and no asyncio. ``submit`` only queues (in arrival
order). ``step`` runs everything queued, cut into batches by :meth:`Planner.drain` (a pure function of
the queued sequence), on the calling thread; ``result`` runs the same batches in the same order but
stops once the ticket it waits for is complete. A host that submits the same sequence on every rank
and calls ``step`` / ``result`` at the same points of its own deterministic loop (the SGLang plugin:
inside the prefill forward that needs the result, where SGLang runs its own encoder) therefore issues
identical collectives on every rank, in the same order relative to the model's own.

A failed forward fails every unit of that batch; it is not bisected as the coalescer does, because a
rank-local failure followed by a different sequence of retries would desynchronise the collectives.

Failures are agreed between ranks when ``agree`` is given (TP>1): a function that takes this rank's
"I failed" flag and returns True if any rank failed (:func:`process_group_agree` all-reduces it over
a CPU process group; the SGLang plugin passes its attention-TP CPU group). It is called twice per batch, at
the same point on every rank: before the forward, on the outcome of a preflight (the tower's
``preflight(units)`` if it has one, else, on CUDA, reserving the batch's budgeted bytes, so an
out-of-memory surfaces before the first collective), and after it, on the forward's outcome. An
agreed failure fails the batch on every rank, so every rank takes the same fallback. What agreement
cannot repair is an exception *between* the tower's own collectives on one rank: the others are
already inside a collective it never joins. The preflight makes the common case (OOM) happen before
the first collective; for the rest the collective's timeout (NCCL's watchdog) is the backstop.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import metrics
from .config import CoalescerConfig
from .errors import EncodeError
from .planner import Planner, PlanUnit
from .types import EncodeItem, Tower
from .units import (
    Spans,
    assemble,
    check_items,
    declared_bytes_per_patch,
    resolve_budget_bytes,
    resolve_device,
    split_into_units,
)


@dataclass(eq=False)
class LockstepTicket:
    """One ``submit`` call: its units' outputs, filled in by ``step``."""

    spans: Spans
    outputs: list[torch.Tensor | None]
    jobs: list[_Job] = field(default_factory=list)
    remaining: int = 0
    error: BaseException | None = None
    cancelled: bool = False
    ready: torch.cuda.Event | None = None

    def done(self) -> bool:
        """True once every unit ran (or one failed): ``result`` will not run a step."""
        return self.remaining == 0 or self.error is not None


class _Job(PlanUnit):
    """One distinct unit; several tickets wait on it when their keys match."""

    __slots__ = ("key", "ran", "unit", "waiters")

    def __init__(self, unit: EncodeItem, key: Hashable | None, arrival: float) -> None:
        super().__init__(num_patches=unit.num_patches, arrival=arrival)
        self.unit = unit
        self.key = key
        self.ran = False  # taken by a batch: no longer in the planner's queue
        self.waiters: list[tuple[LockstepTicket, int]] = []


Agree = Callable[[bool], bool]
"""Takes this rank's failure flag, returns True if any rank failed; called at the same point on every rank."""


def process_group_agree(group: Any = None) -> Agree:
    """An :data:`Agree` over a ``torch.distributed`` CPU (gloo) group: one all-reduce (MAX) of the flag.

    A CPU group keeps the agreement off the GPU streams, so it neither waits behind queued kernels
    nor interleaves with the tower's or the model's NCCL collectives.
    """
    import torch.distributed as dist

    def agree(failed: bool) -> bool:
        flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    return agree


class PeerFailedError(RuntimeError):
    """Another rank failed this batch; this rank fails it too so all ranks take the same path."""


class LockstepEncoder:
    """Queues encode work and runs it, batched under the budget, only when ``step`` is called.

    Safe to call from several threads: one lock serialises ``submit``, ``cancel``, ``step`` and
    ``result`` (forwards included), so a submit can never join a unit whose batch has already delivered.
    Batches stay identical across TP ranks only if each rank calls in the same order, i.e. from one
    thread (the plugin's scheduler thread) or in an order its host makes deterministic.
    """

    def __init__(self, tower: Tower, config: CoalescerConfig | None = None, *, agree: Agree | None = None) -> None:
        self.tower = tower
        self.config = config or CoalescerConfig()
        self.agree = agree
        self._preflight_hook = getattr(tower, "preflight", None)
        self.device = resolve_device(self.config, tower)
        # "auto" would measure each rank's allocator separately and could differ between ranks:
        # only declared or configured sizes keep the batch cuts identical everywhere.
        self.bytes_per_patch = declared_bytes_per_patch(self.config, tower)
        self.budget_bytes = resolve_budget_bytes(self.config, self.device)
        self._planner = Planner(ragged=tower.ragged, bytes_per_patch=self.bytes_per_patch,
                                budget_bytes=self.budget_bytes, max_batch_items=self.config.max_batch_items)
        self._validate_item = getattr(tower, "validate", None)
        self._jobs_by_key: dict[Hashable, _Job] = {}
        self._arrivals = 0
        self.forwards = 0
        self.agreed_failures = 0  # batches failed on every rank because some rank failed
        self._labels = {"coalescer": self.config.name}
        self._lock = threading.Lock()

    @property
    def pending_units(self) -> int:
        return self._planner.pending_units

    def submit(self, items: Sequence[EncodeItem]) -> LockstepTicket:
        """Queue ``items`` (videos split into frame units); nothing runs until ``step``.

        Raises InvalidItemError, naming the item, when one can never be encoded; nothing is queued then.
        """
        with self._lock:
            check_items(items, self._planner, self._validate_item,
                        metrics.ERRORS.labels(kind="invalid_item", **self._labels).inc)
            units, spans = split_into_units(items)
            ticket = LockstepTicket(spans=spans, outputs=[None] * len(units), remaining=len(units))
            for slot, unit in enumerate(units):
                key = unit.key if self.config.dedup else None
                job = self._jobs_by_key.get(key) if key is not None else None
                if job is None:
                    job = _Job(unit, key, float(self._arrivals))
                    self._arrivals += 1
                    self._planner.add([job])
                    if key is not None:
                        self._jobs_by_key[key] = job
                else:
                    metrics.DEDUP_HITS.labels(**self._labels).inc()
                job.waiters.append((ticket, slot))
                ticket.jobs.append(job)
            metrics.UNITS.labels(**self._labels).inc(len(units))
            metrics.QUEUE_PATCHES.labels(**self._labels).set(self._planner.pending_patches)
            return ticket

    def cancel(self, ticket: LockstepTicket) -> None:
        """Stop delivering to ``ticket``; withdraw its queued units that no other ticket waits for."""
        with self._lock:
            ticket.cancelled = True
            self._withdraw(ticket)
            metrics.QUEUE_PATCHES.labels(**self._labels).set(self._planner.pending_patches)

    def _withdraw(self, ticket: LockstepTicket) -> None:
        """Take ``ticket`` off its units; those no other ticket waits for leave the queue."""
        for job in ticket.jobs:
            job.waiters = [w for w in job.waiters if w[0] is not ticket]
            if not job.waiters and not job.ran:
                self._planner.discard(job)
                if job.key is not None and self._jobs_by_key.get(job.key) is job:
                    del self._jobs_by_key[job.key]
        ticket.jobs = []

    def step(self) -> int:
        """Run every queued unit on this thread, in planner order; returns the number of forwards."""
        with self._lock:
            batches = self._planner.drain()
            for batch in batches:
                self._run(batch)  # type: ignore[arg-type]
            metrics.QUEUE_PATCHES.labels(**self._labels).set(self._planner.pending_patches)
            return len(batches)

    def result(self, ticket: LockstepTicket) -> list[torch.Tensor]:
        """The ticket's outputs, one per submitted item; first runs queued batches until it is done.

        On CUDA the caller's current stream is made to wait for the producing stream (no host sync).
        A failed ticket's units that have not run yet are withdrawn before it raises: its reader is gone, and
        nothing else would run them (every rank fails the same tickets, so the queues stay identical).
        """
        with self._lock:
            if ticket.cancelled:
                raise RuntimeError("result() of a cancelled ticket")
            while not ticket.done() and self._planner.pending_units:
                # Queue order (the oldest head first, as in drain()), one batch at a time, stopping once
                # this ticket is complete: later arrivals wait for their own prefill.
                self._run(self._planner.next_batch(math.inf, 0.0))  # type: ignore[arg-type]
            if ticket.error is not None:
                self._withdraw(ticket)
            metrics.QUEUE_PATCHES.labels(**self._labels).set(self._planner.pending_patches)
            if ticket.error is not None:
                raise ticket.error
            if ticket.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ticket.ready)
            return assemble(ticket.outputs, ticket.spans)  # type: ignore[arg-type]

    def _preflight(self, jobs: list[_Job], patches: int) -> None:
        """Raise now, before any collective, what would make this rank fail the forward (OOM)."""
        if self._preflight_hook is not None:
            self._preflight_hook([job.unit for job in jobs])
        elif self.device.type == "cuda":
            # Freed at once; the caching allocator keeps the block for the forward that follows.
            torch.empty(patches * self.bytes_per_patch, dtype=torch.uint8, device=self.device)

    def _run(self, jobs: list[_Job]) -> None:
        patches = sum(job.num_patches for job in jobs)
        metrics.FORWARDS.labels(**self._labels).inc()
        metrics.PATCHES_PER_FORWARD.labels(**self._labels).observe(patches)
        metrics.UNITS_PER_FORWARD.labels(**self._labels).observe(len(jobs))
        metrics.BUDGET_FILL.labels(**self._labels).observe(patches / self._planner.budget_patches)
        self.forwards += 1
        for job in jobs:
            job.ran = True
            if job.key is not None and self._jobs_by_key.get(job.key) is job:
                del self._jobs_by_key[job.key]
        failure: BaseException | None = None
        if self.agree is not None:
            try:
                self._preflight(jobs, patches)
            except Exception as exc:
                failure = exc
            if self.agree(failure is not None):
                self._fail(jobs, patches, failure or PeerFailedError("another rank failed the preflight"))
                return
        ready = None
        outputs: list[torch.Tensor] = []
        try:
            with torch.inference_mode():
                outputs = list(self.tower.forward([job.unit for job in jobs]))
            if len(outputs) != len(jobs):
                raise RuntimeError(f"tower returned {len(outputs)} outputs for {len(jobs)} units")
            if self.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
        except Exception as exc:  # fail this batch's tickets, keep serving
            failure = exc
        if self.agree is not None and self.agree(failure is not None) and failure is None:
            failure = PeerFailedError("another rank failed the forward")
        if failure is not None:
            self._fail(jobs, patches, failure)
            return
        for job, output in zip(jobs, outputs, strict=True):
            for ticket, slot in job.waiters:
                ticket.outputs[slot] = output
                ticket.remaining -= 1
                ticket.ready = ready
            job.waiters = []

    def _fail(self, jobs: list[_Job], patches: int, exc: BaseException) -> None:
        metrics.ERRORS.labels(kind="encode", **self._labels).inc(len(jobs))
        if self.agree is not None:
            self.agreed_failures += 1
        error = EncodeError(f"tower failed on a lockstep batch of {len(jobs)} units, {patches} patches: {exc!r}")
        error.__cause__ = exc
        for job in jobs:
            for ticket, _ in job.waiters:
                ticket.error = ticket.error or error
            job.waiters = []
