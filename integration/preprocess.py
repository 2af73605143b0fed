"""``sglang.preprocess_thread``: SGLang's multimodal preprocessing on an event loop of its own.

The tokenizer manager runs each request's multimodal preprocessing (``process_mm_data_async``: media
loading on SGLang's I/O threads, then the HF processor) as a coroutine on its one event loop, the loop
that also takes requests in and sends replies out. Before SGLang 0.5.17 (Qwen-VL) and 0.5.19 (Gemma),
and later whenever ``--mm-processor-worker-num`` resolves to 1, the HF processor runs synchronously on
that loop. On the real server (0.5.16) a burst's first chunks then left only once the whole burst was
preprocessed (README, "When the first token leaves").

This runs those coroutines on one thread with an event loop of its own, against a clone of SGLang's
processor whose HF processor (and tokenizer) are deep copies, as SGLang 0.5.17+ clones them for its
own workers: the tokenizer manager keeps using the originals on its loop, and the clone is used by one
thread only. Requests still interleave on the new loop as they did on the old one (loading overlaps
processing), and the tokenizer manager's loop is free to answer. Where SGLang already runs the HF
processor off the loop (its ``mm_processor_executor``), nothing is changed.
"""

from __future__ import annotations

import asyncio
import copy
import copyreg
import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from multiprocessing import shared_memory
from types import SimpleNamespace
from typing import Any

from . import sglang_compat

logger = logging.getLogger(__name__)


class PreprocessLoop:
    """One daemon thread running an event loop; coroutines submitted from another loop run here.

    Every ``report_every`` calls it logs one line: how long the calls waited to start on the thread, ran there,
    and waited for the caller's loop to take the result back (a busy tokenizer manager shows in the last).
    """

    def __init__(self, name: str = "mm-coalescer-preprocess", report_every: int = 25) -> None:
        self.loop = asyncio.new_event_loop()
        self.report_every = report_every
        self.calls = 0
        self._window: list[tuple[float, float, float, float]] = []  # (submitted, started, finished, resumed)
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_own_loop(self, method: Callable[..., Coroutine[Any, Any, Any]],
                    then: Callable[..., Any] | None = None) -> Callable[..., Any]:
        """``method``'s coroutines run on this thread's loop, followed by ``then(result, *args, **kwargs)`` (the
        call's own arguments); the caller awaits the result on its own loop.

        Cancelling the caller's task cancels the coroutine here (``run_coroutine_threadsafe``'s future).
        """
        @functools.wraps(method)
        async def on_own_loop(*args: Any, **kwargs: Any) -> Any:
            if self._stopped:  # a coroutine sent to a stopped loop would never be answered
                raise RuntimeError("mm-coalescer: the preprocess thread has stopped")
            self.calls += 1
            submitted = time.monotonic()
            span = [submitted, submitted]

            async def timed() -> Any:
                span[0] = time.monotonic()
                try:
                    result = await method(*args, **kwargs)
                    return result if then is None else then(result, *args, **kwargs)
                finally:
                    span[1] = time.monotonic()

            result = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(timed(), self.loop))
            self._record(submitted, span[0], span[1], time.monotonic())  # answered calls only
            return result

        return on_own_loop

    def _record(self, submitted: float, started: float, finished: float, resumed: float) -> None:
        self._window.append((submitted, started, finished, resumed))
        if len(self._window) >= self.report_every:
            logger.info("mm-coalescer: preprocess_thread, %s", summarize_calls(self._window))
            self._window = []

    def stop(self) -> None:
        """Cancel what runs here (each caller gets ``CancelledError``, none waits forever), then end the thread."""
        self._stopped = True

        async def cancel_then_stop() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.sleep(0)  # each task's callback that answers its caller's future runs first
            self.loop.stop()

        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(cancel_then_stop()))
        self.thread.join(timeout=5)


def summarize_calls(calls: list[tuple[float, float, float, float]]) -> str:
    """One line over (submitted, started, finished, resumed) monotonic times: the span, then per stage p50 / max ms."""
    def stage(values: list[float]) -> str:
        ordered = sorted(values)
        return f"{ordered[len(ordered) // 2] * 1e3:.0f} / {ordered[-1] * 1e3:.0f}"

    span = max(c[3] for c in calls) - min(c[0] for c in calls)
    return (f"{len(calls)} calls in {span:.2f} s (p50 / max ms): "
            f"to start on the thread {stage([c[1] - c[0] for c in calls])}, "
            f"on the thread {stage([c[2] - c[1] for c in calls])}, "
            f"back on the tokenizer manager's loop {stage([c[3] - c[2] for c in calls])}")


def isolated_clone(mm_processor: Any) -> Any:
    """A shallow copy of SGLang's multimodal processor whose HF processor, and every attribute that was that
    processor or its tokenizer, are deep copies (SGLang 0.5.17+ deep-copies the same object for its workers)."""
    hf = mm_processor._processor
    copied = copy.deepcopy(hf)
    swaps = {id(hf): copied}
    tokenizer = getattr(hf, "tokenizer", None)
    if tokenizer is not None:
        swaps[id(tokenizer)] = copied.tokenizer
    clone = copy.copy(mm_processor)
    for name, value in vars(mm_processor).items():
        if id(value) in swaps:
            setattr(clone, name, swaps[id(value)])
    return clone


_loop: PreprocessLoop | None = None


def move_off_the_loop(tokenizer_manager: Any) -> PreprocessLoop | None:
    """Route ``tokenizer_manager``'s multimodal preprocessing to a :class:`PreprocessLoop` (one a process).

    Returns it, or None (one log line says why) when there is nothing to move or SGLang already does it.
    A processor that cannot be cloned keeps SGLang's own path.
    """
    global _loop
    mm_processor = getattr(tokenizer_manager, "mm_processor", None)
    if mm_processor is None:
        return None
    if sglang_compat.processor_runs_off_loop(mm_processor):
        logger.info("mm-coalescer: sglang.preprocess_thread not needed: SGLang runs %s off the tokenizer "
                    "manager's loop itself (--mm-processor-worker-num)", type(mm_processor).__name__)
        return None
    try:
        clone = isolated_clone(mm_processor)
    except Exception:
        logger.warning("mm-coalescer: sglang.preprocess_thread off: cannot clone %s's HF processor",
                       type(mm_processor).__name__, exc_info=True)
        return None
    if _loop is None:
        _loop = PreprocessLoop()
    why_not = handover_stays_sglangs(mm_processor)
    mm_processor.process_mm_data_async = _loop.on_own_loop(clone.process_mm_data_async,
                                                           then=hand_over if why_not is None else None)
    logger.info("mm-coalescer: %s preprocessing runs on thread %s, off the tokenizer manager's event loop, %s",
                type(mm_processor).__name__, _loop.thread.name,
                "and so does the hand-over to /dev/shm" if why_not is None else f"not the hand-over: {why_not}")
    return _loop


def handover_stays_sglangs(mm_processor: Any) -> str | None:
    """Why SGLang's own hand-over of the features must stay where SGLang does it (None: it may move)."""
    if flags := sglang_compat.features_kept_on_gpu(mm_processor):
        return f"features do not go through /dev/shm ({flags})"
    if sglang_compat.tokenizer_manager_hashes_features():
        return "SGLANG_MM_PRECOMPUTE_HASH (the tokenizer manager hashes the features as tensors after preprocessing)"
    if not sglang_compat.pickles_ipc():
        return "SGLANG_USE_PICKLE_IPC is off (SGLang's msgpack transport encodes only its own wrapper class)"
    return None


def hand_over(output: Any, *args: Any, request_obj: Any = None, **kwargs: Any) -> Any:
    """SGLang's own hand-over of a request's features to the scheduler (``wrap_shm_features``: where SGLang's
    transport is shared memory, each CPU feature copied into a fresh ``/dev/shm`` segment), done on this thread
    instead of the tokenizer manager's loop; SGLang's own call before the send then finds nothing left to copy.
    ``args``/``kwargs`` are ``process_mm_data_async``'s: ``request_obj`` (4th) says how many samples it sends.

    Those segments now exist before the request is sent, which SGLang's own order never allowed: each wrapper is
    guarded (:func:`_guard`), so a request that fails or is cancelled before its send leaves no segment behind (a
    process killed in between does: SGLang stops its processes with SIGKILL). The wrapper keeps no reference to
    the feature tensor, which is freed here as SGLang frees it at its send; the tokenizer manager holds the
    request's items until the reply ends. A request sampled n > 1 times is sent once a sample, each send reading
    a segment of its own, so its items keep SGLang's own hand-over at each send. A caller's ``mm_hashes``, set
    after preprocessing, reach the item's ``hash`` but not the wrapper's ``precomputed_hash``, which the scheduler
    reads only for an item without a hash."""
    mm_items = getattr(output, "mm_items", None)
    if request_obj is None and len(args) > 3:
        request_obj = args[3]
    if not mm_items or samples(request_obj) > 1:
        return output
    sglang_compat.wrap_shm_features()(SimpleNamespace(mm_inputs=output))
    pointer_class = sglang_compat.shm_pointer_class()
    for item in mm_items:
        for field in ("feature", "precomputed_embeddings"):
            value = getattr(item, field, None)
            for pointer in value if isinstance(value, (list, tuple)) else (value,):
                if type(pointer) is pointer_class:
                    _guard(pointer)
    return output


def samples(request_obj: Any) -> int:
    """How many samples (``n``) SGLang sends of a request: its sampling parameters' ``n``, 1 without one."""
    params = getattr(request_obj, "sampling_params", None)
    listed = params if isinstance(params, list) else [params]
    return max((int(p.get("n", 1)) for p in listed if isinstance(p, dict)), default=1)


def _guard(pointer: Any) -> None:
    """Make ``pointer`` (SGLang's ``ShmPointerMMData``) unlink its segment when it is dropped unsent.

    Sent means pickled: the request's send pickles its features, and the scheduler unpickles SGLang's own class
    (:func:`_unsent_class`) and unlinks the segment once it has read it, as it does for SGLang's own wrappers."""
    sent = [False]
    pointer.__class__ = _unsent_class()
    pointer.sent = sent
    weakref.finalize(pointer, _unlink_unless_sent, pointer.shm_name, sent)


@functools.cache
def _unsent_class() -> type:
    base = sglang_compat.shm_pointer_class()

    def __reduce_ex__(self: Any, protocol: int) -> tuple[Any, ...]:
        if self.sent[0]:  # the scheduler unlinks a segment once it has read it: a second read would find none
            raise RuntimeError("mm-coalescer: a feature handed over to /dev/shm was sent twice; requests sent more "
                               "than once (n > 1) keep SGLang's own hand-over")
        self.sent[0] = True
        return copyreg._reconstructor, (base, object, None), self.__getstate__()

    return type("UnsentShmPointer", (base,), {
        "__reduce_ex__": __reduce_ex__, "__module__": __name__,
        "__doc__": "SGLang's ShmPointerMMData, not yet sent; it pickles as SGLang's own class."})


def _unlink_unless_sent(name: str, sent: list[bool]) -> None:
    if sent[0]:
        return
    try:
        segment = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()


def stats() -> dict[str, Any]:
    """Preprocessing calls routed to the thread in this process (0 and None when it was never started)."""
    return {"calls": _loop.calls if _loop else 0, "thread": _loop.thread.name if _loop else None}
