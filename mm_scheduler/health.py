"""What the coalescer needs to survive a hung tower: a forward deadline and threads it can walk away from.

A forward that never returns (a deadlocked kernel, a stuck collective, a C call that spins) cannot be
killed from Python: not the thread, not the CUDA kernel. What can be done is to stop waiting for it.
:class:`ForwardDeadline` says how long one forward may take; :class:`DaemonWorkers` runs forwards on
daemon threads, so an abandoned, still-hung thread never blocks interpreter exit (a
``ThreadPoolExecutor`` joins its threads at exit, and would hang the process forever).
:class:`ForwardSupervisor` puts them together: it runs each batch under the deadline, walks away from
a hung one, refuses work while the tower is unhealthy and probes until a forward succeeds again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Literal

import torch

from . import metrics
from .errors import ForwardTimeoutError, TowerUnhealthyError
from .executor import BatchOutcome
from .executor import Executor as TowerExecutor
from .types import EncodeItem

# The coalescer's logger: these records are about its tower, and operators set levels by that name.
logger = logging.getLogger("mm_scheduler.coalescer")

DeadlineSetting = float | Literal["auto"] | None
_thread_serial = itertools.count()  # unique thread names: an abandoned thread and its successor stay apart in logs

_MAX_STUCK_THREADS = 2
"""Health probes start only while fewer abandoned threads than this are still stuck: a wedged device
then strands at most this many probe/forward threads, not one per probe interval."""
_MAX_PROBE_INTERVAL_S = 5.0


class ForwardDeadline:
    """Seconds one forward may take: fixed, off (None), or derived from observed forward times ("auto").

    auto: ``max(FLOOR_S, MULTIPLE x p99)`` over the last ``WINDOW`` forwards, refreshed every
    ``REFRESH_EVERY`` observations (sorting 512 floats is cheap, but not per forward); ``WARMUP_S``
    until ``WARMUP_FORWARDS`` forwards were seen, because the first ones pay for CUDA context set-up,
    cuDNN autotuning and lazy compilation.
    """

    FLOOR_S = 10.0
    MULTIPLE = 20.0
    WARMUP_S = 60.0
    WARMUP_FORWARDS = 20
    WINDOW = 512
    REFRESH_EVERY = 32

    def __init__(self, setting: DeadlineSetting) -> None:
        self.auto = setting == "auto"
        self._samples: deque[float] = deque(maxlen=self.WINDOW)
        self._seen = 0
        if self.auto:
            self.seconds: float | None = self.WARMUP_S
        else:
            self.seconds = float(setting) if setting else None  # type: ignore[arg-type]

    def observe(self, seconds: float) -> bool:
        """Record one forward's duration; True when the deadline changed."""
        if not self.auto:
            return False
        self._samples.append(seconds)
        self._seen += 1
        if self._seen < self.WARMUP_FORWARDS or (self._seen - self.WARMUP_FORWARDS) % self.REFRESH_EVERY:
            return False
        new = max(self.FLOOR_S, self.MULTIPLE * self.p99())
        changed, self.seconds = new != self.seconds, new
        return changed

    def p99(self) -> float:
        """99th percentile (nearest rank) of the observed window; 0 before any observation."""
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class DaemonWorkers(Executor):
    """A tiny thread pool of daemon threads, for work that may never return.

    ``shutdown(wait=False)`` on a pool whose thread is stuck leaves that thread behind: it ends by
    itself if its call ever returns, and never holds up interpreter exit.
    """

    def __init__(self, threads: int, name: str) -> None:
        self._work: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = \
            queue.SimpleQueue()
        self._shutdown = False
        self._lock = threading.Lock()
        self._pending: set[Future[Any]] = set()
        self._threads = [threading.Thread(target=self._serve, name=f"{name}_{next(_thread_serial)}", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if kwargs:
            raise TypeError("DaemonWorkers.submit takes positional arguments only")
        future: Future[Any] = Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            self._pending.add(future)
        self._work.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._pending) if cancel_futures else []
        for future in pending:
            future.cancel()  # only work not yet started: a running future cannot be cancelled
        for _ in self._threads:
            self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _serve(self) -> None:
        while (job := self._work.get()) is not None:
            future, fn, args = job
            with self._lock:
                self._pending.discard(future)
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)
            del job, future, fn, args  # drop references to the batch while idle


class _Watch:
    """Which thread runs one batch, and since when (set by that thread), so the deadline can be checked."""

    __slots__ = ("started", "thread")

    def __init__(self) -> None:
        self.thread: int | None = None
        self.started: float | None = None


class ForwardSupervisor:
    """Runs the coalescer's batches on its forward thread, each within the forward deadline, and tracks
    the tower's health.

    A batch past the deadline is abandoned (its thread left behind, a fresh CUDA stream for later
    work), the tower turns unhealthy (``on_unhealthy``: the coalescer fails what is queued), and a
    probe forward runs on a fresh thread every interval until one succeeds (``on_healthy``).
    ``on_thread_free`` says the forward thread may take the next batch (before a completion wait);
    probing stops once ``closing()`` is true.
    """

    def __init__(self, executor: TowerExecutor, name: str, deadline: DeadlineSetting, event_threads: int, *,
                 on_thread_free: Callable[[], None], on_unhealthy: Callable[[], None],
                 on_healthy: Callable[[], None], closing: Callable[[], bool]) -> None:
        self.executor = executor
        self.name = name
        self.deadline = ForwardDeadline(deadline)
        self.healthy = True
        self.counts = {"forward_timeouts": 0, "health_probes": 0}
        self._event_threads = event_threads
        self._on_thread_free = on_thread_free
        self._on_unhealthy = on_unhealthy
        self._on_healthy = on_healthy
        self._closing = closing
        self._labels = {"coalescer": name}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forward_thread: DaemonWorkers | None = None
        self._event_waiters: DaemonWorkers | None = None
        self._unhealthy_since = 0.0
        self._prober: asyncio.Task[None] | None = None
        self._thread_back: asyncio.Event | None = None
        self._stuck: set[Future[Any]] = set()
        self._probe_unit: EncodeItem | None = None

    @property
    def stuck_threads(self) -> int:
        """Abandoned threads whose call has not returned yet."""
        return len(self._stuck)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread_back = asyncio.Event()
        self._forward_thread = self._new_forward_thread()
        self._event_waiters = self._new_event_waiters()
        metrics.TOWER_HEALTHY.labels(**self._labels).set(1)
        metrics.FORWARD_DEADLINE.labels(**self._labels).set(self.deadline.seconds or 0)

    async def aclose(self) -> None:
        """Stop probing and end the idle threads; abandoned (stuck) threads are not waited for."""
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        if self._forward_thread is not None:
            self._forward_thread.shutdown(wait=True)
        self._event_waiters.shutdown(wait=True)

    def error(self) -> TowerUnhealthyError:
        """What work gets while the tower is unhealthy."""
        return TowerUnhealthyError(f"coalescer {self.name}: the tower is unhealthy (a forward ran past its "
                                   f"deadline); use another path until a health probe succeeds")

    async def run(self, units: list[EncodeItem], sync: bool,
                  launched: Callable[[BatchOutcome], None] | None = None) -> BatchOutcome:
        """Run ``units``; learn the deadline from its forward times and keep its first unit as the probe
        if it encoded fine and is the smallest yet. ``sync`` and ``launched``: see :meth:`_run`."""
        outcome = await self._run(units, sync, launched)
        for forward_seconds in outcome.forward_seconds:
            if self.deadline.observe(forward_seconds):
                metrics.FORWARD_DEADLINE.labels(**self._labels).set(self.deadline.seconds or 0)
        if isinstance(outcome.outputs[0], torch.Tensor) and (
                self._probe_unit is None or units[0].num_patches < self._probe_unit.num_patches):
            self._probe_unit = units[0]  # the smallest unit that encoded fine: what health probes run
        return outcome

    async def _run(self, units: list[EncodeItem], sync: bool,
                   launched: Callable[[BatchOutcome], None] | None) -> BatchOutcome:
        """The batch on the forward thread, then its CUDA completion event: each within the forward deadline.

        ``sync`` (a lone batch): the forward thread also waits for the event, saving the loop ->
        event-waiter -> loop hops; otherwise it returns at once, so the next batch pipelines behind it.
        ``launched`` is called with the outcome once the forward thread returned it, before that wait.
        """
        worker = self._forward_thread
        if worker is None or not self.healthy:
            return BatchOutcome(outputs=[self.error()] * len(units))
        watch = _Watch()
        forward = worker.submit(self._watched_run, units, watch, sync)
        if not await self._in_time(forward, lambda: self.executor.forward_started(watch.thread) or watch.started):
            what = "forward" if watch.started is None else "wait for the CUDA completion event"
            return self._timed_out(forward, what, units)
        if forward.cancelled():  # it was queued behind a forward that hung, on the abandoned thread
            return BatchOutcome(outputs=[self.error()] * len(units))
        outcome: BatchOutcome = forward.result()
        self._on_thread_free()
        if launched is not None:
            launched(outcome)
        if outcome.done is not None and not outcome.done.query():
            began = time.monotonic()
            done = self._event_waiters.submit(outcome.done.synchronize)
            if not await self._in_time(done, lambda: began):
                return self._timed_out(done, "wait for the CUDA completion event", units)
            if done.cancelled():
                return BatchOutcome(outputs=[self.error()] * len(units))
            done.result()
            outcome.forward_seconds.append(time.monotonic() - began)
        return outcome

    async def completed(self, event: torch.cuda.Event) -> None:
        """Wait for ``event`` on an event-waiter thread, off the loop (a video's join: one small kernel)."""
        await asyncio.wrap_future(self._event_waiters.submit(event.synchronize), loop=self._loop)  # type: ignore[union-attr]

    def _watched_run(self, units: list[EncodeItem], watch: _Watch, sync: bool = False) -> BatchOutcome:
        watch.thread = threading.get_ident()
        outcome = self.executor.run(units)
        if sync and outcome.done is not None:
            watch.started = began = time.monotonic()  # the forward deadline watches this wait too
            outcome.done.synchronize()
            outcome.forward_seconds.append(time.monotonic() - began)
        return outcome

    async def _in_time(self, work: Future[Any], started: Callable[[], float | None]) -> bool:
        """Wait for ``work``; False once it has run past the forward deadline, counted from ``started()``.

        ``started()`` is None while the work has not begun (queued, or between two bisection forwards):
        then a full deadline is waited before looking again.
        """
        waiter = asyncio.wrap_future(work, loop=self._loop)
        while True:
            limit = self.deadline.seconds
            if limit is None:
                await asyncio.wait((waiter,))
                return True
            begun = started()
            remaining = limit if begun is None else begun + limit - time.monotonic()
            if remaining <= 0:
                waiter.cancel()  # detach: the thread keeps running; its late result is dropped
                return False
            done, _ = await asyncio.wait((waiter,), timeout=remaining)
            if done:
                return True

    def _timed_out(self, hung: Future[Any], what: str, units: list[EncodeItem]) -> BatchOutcome:
        error = ForwardTimeoutError(f"the tower's {what} ran past the {self.deadline.seconds:g} s forward deadline "
                                    f"(forward_timeout_s); it was abandoned: a running forward cannot be killed")
        self._abandon(hung, what, len(units))
        return BatchOutcome(outputs=[error] * len(units))

    def _abandon(self, hung: Future[Any], what: str, units: int) -> None:
        """A forward hung: leave its thread behind and refuse work until a health probe succeeds."""
        self.counts["forward_timeouts"] += 1
        metrics.FORWARD_TIMEOUTS.labels(**self._labels).inc()
        self._leave_behind(hung)
        if not self.healthy:
            return
        self.healthy = False
        self._unhealthy_since = time.monotonic()
        metrics.TOWER_HEALTHY.labels(**self._labels).set(0)
        logger.error("coalescer %s: a %s ran past its %.3g s deadline; tower marked UNHEALTHY: its %d units failed "
                     "(ForwardTimeoutError), queued and new requests are refused (TowerUnhealthyError) until a "
                     "health probe succeeds; the hung thread is abandoned (it cannot be killed)",
                     self.name, what, self.deadline.seconds, units)
        for pool in (self._forward_thread, self._event_waiters):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._forward_thread = None
        self._event_waiters = self._new_event_waiters()
        self.executor.renew_stream()
        self._on_unhealthy()
        self._prober = self._loop.create_task(self._probe_until_healthy(), name=f"mm-probe-{self.name}")

    def _leave_behind(self, work: Future[Any]) -> None:
        """Count ``work``'s thread as stuck until its call returns (which wakes the prober)."""
        self._stuck.add(work)
        work.add_done_callback(self._thread_returned)

    def _thread_returned(self, work: Future[Any]) -> None:
        """Runs on the abandoned thread when its call finally returns (or at once if it already had)."""
        try:
            self._loop.call_soon_threadsafe(self._on_thread_returned, work)
        except RuntimeError:  # the loop is closed: nobody left to tell
            pass

    def _on_thread_returned(self, work: Future[Any]) -> None:
        self._stuck.discard(work)
        self._thread_back.set()

    async def _probe_until_healthy(self) -> None:
        """While unhealthy: one small forward on a fresh thread and CUDA stream, every interval and as soon
        as an abandoned thread returns. The thread of the first probe that succeeds becomes the forward thread.

        With no unit to probe with (nothing ever encoded fine), the hung forward's return is the signal.
        """
        probes = 0
        while not self._closing():
            interval = min(self.deadline.seconds or _MAX_PROBE_INTERVAL_S, _MAX_PROBE_INTERVAL_S)
            try:
                await asyncio.wait_for(self._thread_back.wait(), interval)
            except TimeoutError:
                pass
            self._thread_back.clear()
            if len(self._stuck) >= _MAX_STUCK_THREADS:
                continue
            if self._probe_unit is None:
                if not self._stuck:
                    self._forward_thread = self._new_forward_thread()
                    self._recovered(probes, "the hung forward returned")
                    return
                continue
            probes += 1
            worker = self._new_forward_thread()
            if await self._probe(worker, dataclasses.replace(self._probe_unit, key=None)):
                self._forward_thread = worker
                self._recovered(probes, "a probe forward succeeded")
                return

    async def _probe(self, worker: DaemonWorkers, unit: EncodeItem) -> bool:
        self.counts["health_probes"] += 1
        watch = _Watch()
        probe = worker.submit(self._probe_run, unit, watch)
        try:
            in_time = await self._in_time(probe, lambda: watch.started)
        except BaseException:
            worker.shutdown(wait=False)
            raise
        if not in_time:
            outcome = "hung"
            self._leave_behind(probe)
        else:
            try:
                outcome = "ok" if probe.result() else "failed"
            except Exception:
                outcome = "failed"
        metrics.HEALTH_PROBES.labels(outcome=outcome, **self._labels).inc()
        if outcome != "ok":
            logger.debug("coalescer %s: health probe %s", self.name, outcome)
            worker.shutdown(wait=False)
        return outcome == "ok"

    def _probe_run(self, unit: EncodeItem, watch: _Watch) -> bool:
        watch.started = time.monotonic()
        outcome = self.executor.run([unit])
        if outcome.done is not None:
            outcome.done.synchronize()
        return isinstance(outcome.outputs[0], torch.Tensor)

    def _recovered(self, probes: int, how: str) -> None:
        self.healthy = True
        metrics.TOWER_HEALTHY.labels(**self._labels).set(1)
        logger.warning("coalescer %s: tower HEALTHY again after %.1f s (%s; %d probe(s)); serving on a fresh forward "
                       "thread and stream; %d abandoned thread(s) still stuck", self.name,
                       time.monotonic() - self._unhealthy_since, how, probes, len(self._stuck))
        self._on_healthy()

    def _new_forward_thread(self) -> DaemonWorkers:
        return DaemonWorkers(1, f"mm-forward-{self.name}")

    def _new_event_waiters(self) -> DaemonWorkers:
        return DaemonWorkers(self._event_threads, f"mm-event-{self.name}")
