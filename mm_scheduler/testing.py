"""Fake towers for tests and the CPU benchmark: deterministic, observable, and breakable on demand.

A fake tower's output for a unit is a pure function of that unit's pixels (:func:`expected_output`),
so a test can prove that every result reached the request and the position it belongs to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Hashable, Sequence
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
      busy while it queues more work.
    Every call, successful or not, is appended to ``log``.
    """

    def __init__(self, *, ragged: bool = False, bytes_per_patch: int = 1024, fixed_s: float = 0.0,
                 per_patch_s: float = 0.0, fail_keys: Collection[Hashable] = (),
                 capacity_patches: int | None = None, gate: threading.Event | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.ragged = ragged
        self.bytes_per_patch = bytes_per_patch
        self.device = "cpu"
        self.fixed_s = fixed_s
        self.per_patch_s = per_patch_s
        self.fail_keys = set(fail_keys)
        self.capacity_patches = capacity_patches
        self.gate = gate
        self.sleep = sleep
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
            if self.gate is not None and not self.gate.wait(timeout=30):
                raise TimeoutError("fake tower gate was never opened")
            if not self.ragged and len(set(record.patch_counts)) > 1:
                raise AssertionError(f"uniform tower got mixed patch counts {sorted(set(record.patch_counts))}")
            if self.capacity_patches is not None and record.patches > self.capacity_patches:
                raise torch.OutOfMemoryError(
                    f"fake OOM: {record.patches} patches > capacity {self.capacity_patches}")
            poisoned = [k for k in record.keys if k is not None and self._base_key(k) in self.fail_keys]
            if poisoned:
                raise RuntimeError(f"poisoned unit(s) {poisoned}")
            delay = self.fixed_s + self.per_patch_s * record.patches
            if delay > 0:
                self.sleep(delay)
            return [expected_output(u) for u in units]
        finally:
            with self._lock:
                self.concurrent_forwards -= 1

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
