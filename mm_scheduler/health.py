"""What the coalescer needs to survive a hung tower: a forward deadline and threads it can walk away from.

A forward that never returns (a deadlocked kernel, a stuck collective, a C call that spins) cannot be
killed from Python: not the thread, not the CUDA kernel. What can be done is to stop waiting for it.
:class:`ForwardDeadline` says how long one forward may take; :class:`DaemonWorkers` runs forwards on
daemon threads, so an abandoned, still-hung thread never blocks interpreter exit (a
``ThreadPoolExecutor`` joins its threads at exit, and would hang the process forever).
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, Literal

DeadlineSetting = float | Literal["auto"] | None
_thread_serial = itertools.count()  # unique thread names: an abandoned thread and its successor stay apart in logs


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
