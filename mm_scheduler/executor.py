"""Runs one batch on a tower: dedicated CUDA stream, completion event, failure bisection.

``run`` is called on the coalescer's forward thread. It never raises: every unit gets either its
output or the exception that a forward of that unit alone raised. A failing batch is split in
halves and retried until the failing units are isolated, so one poisoned image fails only its own
request. Out-of-memory errors are reported so the planner can shrink that bucket's budget.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .types import EncodeItem, Tower


@dataclass(slots=True)
class BatchOutcome:
    """What became of one dispatched batch."""

    outputs: list[torch.Tensor | BaseException]
    forward_sizes: list[int] = field(default_factory=list)
    """Patch count of every forward attempted (more than one when the batch was bisected)."""
    oom_patches: list[int] = field(default_factory=list)
    """Patch count of every forward that ran out of memory."""
    done: torch.cuda.Event | None = None
    """Recorded on the executor's stream after the last forward; outputs are valid once it completes."""


class Executor:
    """Runs batches on ``tower``; on CUDA inside a dedicated stream, so encodes overlap other work."""

    def __init__(self, tower: Tower, device: torch.device, dedicated_stream: bool = True) -> None:
        self.tower = tower
        self.device = device
        self._stream: torch.cuda.Stream | None = None
        if device.type == "cuda" and dedicated_stream:
            self._stream = torch.cuda.Stream(device=device)
        self._thread_ready = threading.local()

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return self._stream

    def run(self, units: Sequence[EncodeItem]) -> BatchOutcome:
        outcome = BatchOutcome(outputs=[None] * len(units))  # type: ignore[list-item]
        on_cuda = self.device.type == "cuda"
        if on_cuda and not getattr(self._thread_ready, "device_set", False):
            torch.cuda.set_device(self.device)
            self._thread_ready.device_set = True
        stream_ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with stream_ctx, torch.inference_mode():
            if self._stream is not None:
                # Inputs staged by the caller on the default stream must land before we read them.
                self._stream.wait_stream(torch.cuda.default_stream(self.device))
            self._run_range(units, 0, len(units), outcome)
            if on_cuda:
                outcome.done = torch.cuda.Event()
                outcome.done.record()
        return outcome

    def _run_range(self, units: Sequence[EncodeItem], lo: int, hi: int, outcome: BatchOutcome) -> None:
        part = units[lo:hi]
        patches = sum(u.num_patches for u in part)
        outcome.forward_sizes.append(patches)
        try:
            outputs = list(self.tower.forward(part))
            if len(outputs) != len(part):
                raise RuntimeError(f"tower returned {len(outputs)} outputs for {len(part)} units")
            outcome.outputs[lo:hi] = outputs
            return
        except torch.OutOfMemoryError as exc:
            outcome.oom_patches.append(patches)
            failure: BaseException = exc
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:
            failure = exc
        if hi - lo == 1:
            outcome.outputs[lo] = failure
            return
        del failure  # drop the traceback's references to the failed forward's tensors before retrying
        mid = (lo + hi) // 2
        self._run_range(units, lo, mid, outcome)
        self._run_range(units, mid, hi, outcome)
