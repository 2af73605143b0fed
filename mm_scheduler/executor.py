"""Runs one batch on a tower: dedicated CUDA stream, completion event, failure bisection.

``run`` is called on the coalescer's forward thread. It never raises: every unit gets either its
output or the exception that a forward of that unit alone raised. A failing batch is split in
halves and retried until the failing units are isolated, so one poisoned image fails only its own
request. Out-of-memory errors are reported so the planner can shrink that bucket's budget.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .types import EncodeItem, Tower
from .units import Spans, assemble


@dataclass(slots=True)
class BatchOutcome:
    """What became of one dispatched batch."""

    outputs: list[torch.Tensor | BaseException]
    forward_sizes: list[int] = field(default_factory=list)
    """Patch count of every forward attempted (more than one when the batch was bisected)."""
    oom_patches: list[int] = field(default_factory=list)
    """Patch count of every forward that ran out of memory."""
    forward_seconds: list[float] = field(default_factory=list)
    """Host time of every forward call (what the automatic forward deadline learns from)."""
    launch_seconds: float = 0.0
    """Host time the forward thread spent inside the tower's forward calls: launching kernels, and any host work
    or sync the tower does. Next to :meth:`gpu_seconds` it says what bounds a batch: a launch time close to the
    stream time is a forward paced by its launches (CPU, the GIL), a much shorter one a forward waiting on the GPU."""
    started: torch.cuda.Event | None = None
    """Recorded on the executor's stream before the first forward, after the waits for its inputs."""
    done: torch.cuda.Event | None = None
    """Recorded on the executor's stream after the last forward; outputs are valid once it completes."""

    def gpu_seconds(self) -> float | None:
        """The batch's time on the encoder stream (``started`` to ``done``, once ``done`` completed): its own
        forwards, under whatever else shares the GPU, without the batch queued before it on the stream (which
        host-side dispatch-to-result times include when two are in flight). With ``stream: current`` the events
        are on the forward thread's current stream, and other work queued there counts too. None off CUDA,
        before then, or if CUDA cannot say (a timing is never worth failing a batch's delivery)."""
        if self.started is None or self.done is None:
            return None
        try:
            return self.started.elapsed_time(self.done) / 1000 if self.done.query() else None
        except RuntimeError:
            return None


def wait_for_inputs(units: Sequence[EncodeItem], stream: torch.cuda.Stream) -> None:
    """Order ``stream`` after the producers of CUDA inputs and tie their memory to it.

    The producer is whatever stream the caller's pixels were written on (SGLang's schedule or
    forward stream, never reliably the default one): its ``ready`` event, which every CUDA input
    carries (``Coalescer.encode`` and the plugin record it at submit), says when they landed.
    ``record_stream`` keeps the caching allocator from handing their blocks to anyone else until
    this stream has read them, even if the caller drops its reference first.
    """
    waited: set[int] = set()
    for unit in units:
        pixels = unit.pixel_values
        if not isinstance(pixels, torch.Tensor) or not pixels.is_cuda:
            continue
        if unit.ready is not None and id(unit.ready) not in waited:
            waited.add(id(unit.ready))
            stream.wait_event(unit.ready)
        pixels.record_stream(stream)


def own_storage(output: object) -> object:
    """A view into a larger CUDA batch buffer keeps the whole buffer alive: copy it out so holding
    one result holds only its own device bytes (and freeing it frees them).

    Only CUDA outputs: that clone is ordered on the encoder stream after the kernels that write the
    buffer. A host view may still be the target of a non-blocking device-to-host copy that lands
    only when the batch's event completes; cloning it now would read stale bytes.
    """
    if isinstance(output, torch.Tensor) and output.is_cuda and \
            output.untyped_storage().nbytes() > output.numel() * output.element_size():
        return output.clone()
    return output


def deliverable_at_launch(outcome: BatchOutcome) -> bool:
    """Whether a consumer may take these outputs before the batch completed (``handover: enqueued``): CUDA
    tensors, which its stream can wait for with ``done``, and failures; not host tensors of a CUDA batch,
    which a non-blocking device-to-host copy may still be filling."""
    return all(not isinstance(out, torch.Tensor) or out.is_cuda or outcome.done is None for out in outcome.outputs)


def sleeping_event(enable_timing: bool = False) -> torch.cuda.Event:
    """A CUDA event whose ``synchronize()`` puts the waiting thread to sleep (``cudaEventBlockingSync``).

    Why: CUDA's default wait spins (``cudaDeviceScheduleAuto`` spins while a process has fewer CUDA contexts than
    the machine has cores), so a thread waiting for a forward keeps a core busy for the forward's whole length. In
    the real server that core is taken from the tokenizer manager's image processing, which paces a burst's first
    tokens (README, "Host waits sleep"). A sleeping wait's wake-up latency (not measured here) is small beside
    a forward of milliseconds.
    """
    return torch.cuda.Event(enable_timing=enable_timing, blocking=True)


def wait_asleep(tensor: torch.Tensor) -> None:
    """Return once the work queued so far on the current stream of ``tensor``'s device is done, the thread asleep
    meanwhile (nothing to wait for on the CPU): call it before a host read of ``tensor`` that would otherwise wait
    spinning (a boolean-mask index copies a count to the host)."""
    if tensor.is_cuda:
        queued = sleeping_event()
        queued.record(torch.cuda.current_stream(tensor.device))
        queued.synchronize()


def join(outputs: list[torch.Tensor], spans: Spans, join_stream: torch.cuda.Stream | None,
         events: Sequence[torch.cuda.Event]) -> tuple[list[torch.Tensor], tuple[torch.cuda.Event, ...]]:
    """:func:`assemble`, and the events a consumer's stream must wait for before reading the results.

    A video's frames are joined with ``torch.cat`` on the caller's (the event loop's) thread, whose
    current stream is the legacy default one: nothing there orders the join before a consumer's reads.
    So the join runs on ``join_stream`` (the coalescer's own, which carries nothing else), after
    ``events`` (the batches still writing the frames, with ``handover: enqueued``; none otherwise),
    with the frames tied to it until it has read them; its own event is the last one returned.
    """
    if join_stream is None or spans is None or all(b - a == 1 for a, b in spans):
        return assemble(outputs, spans), tuple(events)
    with torch.cuda.stream(join_stream):
        for event in events:
            join_stream.wait_event(event)
        for out in outputs:
            if isinstance(out, torch.Tensor) and out.is_cuda:
                out.record_stream(join_stream)
        results = assemble(outputs, spans)
    joined = sleeping_event()  # the coalescer waits for it on the host
    joined.record(join_stream)
    return results, (*events, joined)


class Executor:
    """Runs batches on ``tower``; on CUDA inside a dedicated stream, so encodes overlap other work."""

    def __init__(self, tower: Tower, device: torch.device, dedicated_stream: bool = True) -> None:
        self.tower = tower
        self.device = device
        self._stream: torch.cuda.Stream | None = None
        if device.type == "cuda" and dedicated_stream:
            self._stream = torch.cuda.Stream(device=device)
        # Where a video's frame outputs are joined (:func:`join`); nothing else runs on it.
        self.join_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._thread_ready = threading.local()
        self._forward_started: dict[int, float] = {}

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return self._stream

    def forward_started(self, thread: int | None) -> float | None:
        """``time.monotonic()`` at which ``thread``'s current tower forward began; None between forwards."""
        return None if thread is None else self._forward_started.get(thread)

    def renew_stream(self) -> None:
        """After a hung forward: later work goes on fresh streams, not queued behind the stuck kernel (a join
        may be waiting for that forward's event)."""
        if self._stream is not None:
            self._stream = torch.cuda.Stream(device=self.device)
        if self.join_stream is not None:
            self.join_stream = torch.cuda.Stream(device=self.device)

    def run(self, units: Sequence[EncodeItem]) -> BatchOutcome:
        outcome = BatchOutcome(outputs=[None] * len(units))  # type: ignore[list-item]
        on_cuda = self.device.type == "cuda"
        if on_cuda and not getattr(self._thread_ready, "device_set", False):
            torch.cuda.set_device(self.device)
            self._thread_ready.device_set = True
        stream_ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with stream_ctx, torch.inference_mode():
            stream = torch.cuda.current_stream() if on_cuda else None  # both events on it, whatever a forward does
            if stream is not None:
                wait_for_inputs(units, stream)  # with ``stream: current`` too: that is the legacy default stream
                outcome.started = torch.cuda.Event(enable_timing=True)
                outcome.started.record(stream)
            self._run_range(units, 0, len(units), outcome)
            if stream is not None:
                outcome.done = sleeping_event(enable_timing=True)  # waited for on the host
                outcome.done.record(stream)
        return outcome

    def _run_range(self, units: Sequence[EncodeItem], lo: int, hi: int, outcome: BatchOutcome) -> None:
        part = units[lo:hi]
        patches = sum(u.num_patches for u in part)
        outcome.forward_sizes.append(patches)
        thread = threading.get_ident()
        started = self._forward_started[thread] = time.monotonic()
        try:
            outputs = list(self.tower.forward(part))
            if len(outputs) != len(part):
                raise RuntimeError(f"tower returned {len(outputs)} outputs for {len(part)} units")
            outcome.outputs[lo:hi] = [own_storage(out) for out in outputs]
            return
        except torch.OutOfMemoryError as exc:
            outcome.oom_patches.append(patches)
            failure: BaseException = exc  # no empty_cache(): it syncs the device; the planner shrinks instead
        except Exception as exc:
            failure = exc
        finally:
            del self._forward_started[thread]
            elapsed = time.monotonic() - started
            outcome.forward_seconds.append(elapsed)
            outcome.launch_seconds += elapsed
        if hi - lo == 1:
            outcome.outputs[lo] = failure
            return
        del failure  # drop the traceback's references to the failed forward's tensors before retrying
        mid = (lo + hi) // 2
        self._run_range(units, lo, mid, outcome)
        self._run_range(units, mid, hi, outcome)
