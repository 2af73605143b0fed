"""Fake towers for tests and the CPU benchmark: deterministic, observable, and breakable on demand.

A fake tower's output for a unit is a pure function of that unit's pixels (:func:`expected_output`),
so a test can prove that every result reached the request and the position it belongs to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .types import EncodeItem


def expected_output(unit: EncodeItem) -> torch.Tensor:
    """What a fake tower returns for one unit (image or single frame): ``[num_patches, 2]``.

    Column 0 is a fingerprint of the pixels, column 1 the patch index, so outputs of different units
    differ and a misrouted or reordered result is caught.
    """
    fingerprint = float(unit.pixel_values.double().sum()) + 0.001 * unit.pixel_values.numel()
    out = torch.empty(unit.num_patches, 2, dtype=torch.float64)
    out[:, 0] = fingerprint
    out[:, 1] = torch.arange(unit.num_patches, dtype=torch.float64)
    return out


def expected_encoding(item: EncodeItem) -> torch.Tensor:
    """What ``Coalescer.encode`` must return for ``item`` with a fake tower (videos: frames concatenated)."""
    if item.modality == "video":
        frames = [EncodeItem(f, item.num_patches, "video") for f in item.pixel_values]
        return torch.cat([expected_output(f) for f in frames], dim=0)
    return expected_output(item)


@dataclass(frozen=True, slots=True)
class ForwardRecord:
    """One call of ``forward``: the units' patch counts and keys, in the order the tower saw them."""

    patch_counts: tuple[int, ...]
    keys: tuple[Hashable | None, ...]
    thread: str

    @property
    def patches(self) -> int:
        return sum(self.patch_counts)


class FakeTower:
    """A tower with a latency model ``fixed_s + per_patch_s * patches`` and injectable faults.

    - ``ragged=False`` makes a forward that mixes patch counts raise (as SigLIP would).
    - ``fail_keys``: a forward containing a unit with one of these keys raises RuntimeError.
    - ``capacity_patches``: a forward above it raises ``torch.OutOfMemoryError``.
    - ``gate``: when given, every forward first waits for this event, so a test can hold the tower
      busy while it queues more work. A gate left closed fails the forward after ``gate_timeout_s``
      and every later gated forward at once (so a failing test tears down in seconds, not minutes);
      :meth:`release` opens it.
    - ``hang_keys``: a forward containing one of these keys blocks with no timeout (an unbounded
      hang) until :meth:`release`; ``hanging`` is set once such a forward has started.
    - ``slow_keys``: key -> extra seconds a forward containing it sleeps.
    - ``oom_keys``: a forward of more than one unit containing one of these raises
      ``torch.OutOfMemoryError`` (a transient OOM: the unit alone fits).
    - ``malformed_keys``: the tower returns garbage for these units: a ``list`` instead of a tensor
      for an image, rows of width 3 instead of 2 for video frames after the first.
    - ``on_forward``: called on the forward thread with each forward's record as it starts (a soak
      uses it to cancel requests while their batch runs).
    Every call, successful or not, is appended to ``log``.
    """

    def __init__(self, *, ragged: bool = False, bytes_per_patch: int = 1024, fixed_s: float = 0.0,
                 per_patch_s: float = 0.0, fail_keys: Collection[Hashable] = (),
                 capacity_patches: int | None = None, gate: threading.Event | None = None,
                 gate_timeout_s: float = 5.0, hang_keys: Collection[Hashable] = (),
                 slow_keys: Mapping[Hashable, float] | None = None, oom_keys: Collection[Hashable] = (),
                 malformed_keys: Collection[Hashable] = (),
                 on_forward: Callable[[ForwardRecord], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.ragged = ragged
        self.bytes_per_patch = bytes_per_patch
        self.device = "cpu"
        self.fixed_s = fixed_s
        self.per_patch_s = per_patch_s
        self.fail_keys = set(fail_keys)
        self.capacity_patches = capacity_patches
        self.gate = gate
        self.gate_timeout_s = gate_timeout_s
        self.hang_keys = set(hang_keys)
        self.slow_keys = dict(slow_keys or {})
        self.oom_keys = set(oom_keys)
        self.malformed_keys = set(malformed_keys)
        self.on_forward = on_forward
        self.sleep = sleep
        self.hanging = threading.Event()
        self.hung_forwards = 0
        self._released = threading.Event()
        self._gate_expired = False
        self.log: list[ForwardRecord] = []
        self._lock = threading.Lock()
        self.concurrent_forwards = 0
        self.max_concurrent_forwards = 0

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        record = ForwardRecord(tuple(u.num_patches for u in units), tuple(u.key for u in units),
                               threading.current_thread().name)
        with self._lock:
            self.log.append(record)
            self.concurrent_forwards += 1
            self.max_concurrent_forwards = max(self.max_concurrent_forwards, self.concurrent_forwards)
        try:
            if self.on_forward is not None:
                self.on_forward(record)
            if self.gate is not None:
                self._wait_for_gate()
            base_keys = [self._base_key(k) for k in record.keys if k is not None]
            if self.hang_keys and not self.hang_keys.isdisjoint(base_keys):
                with self._lock:
                    self.hung_forwards += 1
                self.hanging.set()
                self._released.wait()
            if not self.ragged and len(set(record.patch_counts)) > 1:
                raise AssertionError(f"uniform tower got mixed patch counts {sorted(set(record.patch_counts))}")
            if self.capacity_patches is not None and record.patches > self.capacity_patches:
                raise torch.OutOfMemoryError(
                    f"fake OOM: {record.patches} patches > capacity {self.capacity_patches}")
            if len(units) > 1 and self.oom_keys and not self.oom_keys.isdisjoint(base_keys):
                raise torch.OutOfMemoryError(f"fake transient OOM on a {record.patches}-patch forward")
            poisoned = [k for k in record.keys if k is not None and self._base_key(k) in self.fail_keys]
            if poisoned:
                raise RuntimeError(f"poisoned unit(s) {poisoned}")
            delay = self.fixed_s + self.per_patch_s * record.patches
            if self.slow_keys:
                delay += max((self.slow_keys.get(k, 0.0) for k in base_keys), default=0.0)
            if delay > 0:
                self.sleep(delay)
            outputs = [expected_output(u) for u in units]
            if self.malformed_keys:
                outputs = [self._malform(u, out) for u, out in zip(units, outputs, strict=True)]
            return outputs
        finally:
            with self._lock:
                self.concurrent_forwards -= 1

    def release(self) -> None:
        """Open the gate for good and end every hang: what a test calls before it lets go of the tower."""
        self._released.set()
        if self.gate is not None:
            self.gate.set()

    def _wait_for_gate(self) -> None:
        assert self.gate is not None
        deadline = time.monotonic() + self.gate_timeout_s
        while not self.gate.wait(timeout=0.01):
            if self._released.is_set():
                return
            if self._gate_expired or time.monotonic() >= deadline:
                self._gate_expired = True
                raise TimeoutError(f"fake tower gate was not opened within {self.gate_timeout_s} s")

    def _malform(self, unit: EncodeItem, output: torch.Tensor) -> object:
        if unit.key is None or self._base_key(unit.key) not in self.malformed_keys:
            return output
        if unit.modality == "image":
            return output.tolist()
        frame = unit.key[1] if isinstance(unit.key, tuple) else 0
        return output if frame == 0 else torch.cat([output, output[:, :1]], dim=1)

    @staticmethod
    def _base_key(key: Hashable) -> Hashable:
        """Video frame units carry ``(item_key, frame_index)``; faults are injected per item."""
        return key[0] if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], int) else key


class NoopTower:
    """Returns one shared tensor per unit instantly: isolates the coalescer's own CPU cost."""

    def __init__(self, *, ragged: bool = True, bytes_per_patch: int = 1) -> None:
        self.ragged = ragged
        self.bytes_per_patch = bytes_per_patch
        self.device = "cpu"
        self._out = torch.zeros(1)

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        return [self._out] * len(units)
