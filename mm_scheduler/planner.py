"""Pending units -> batches. Pure and synchronous: no asyncio, no torch, no clock.

The planner owns the queue of pending units, grouped into buckets: one bucket per patch count for
towers that need uniform batches, a single bucket for ragged towers. Time only enters as the
``now`` a caller passes in (seconds from a clock, or a scheduler-iteration counter in lockstep
mode), so every decision is a function of the arguments and can be tested exhaustively.

Choosing a batch:
0. Units someone is blocked on (:meth:`Planner.expedite`: a prefill needs them now) go first.
1. A bucket whose oldest unit has waited ``max_wait`` or longer is *aged*: the one with the oldest
   head goes first, so rare resolutions are never starved by busy ones.
2. Otherwise the bucket that fills the largest share of its budget goes first (throughput).
3. Inside a bucket units leave in arrival order until the next one would break the patch budget or
   ``max_batch_items``. The head always leaves, so a unit larger than an OOM-shrunk budget still runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


class PlanUnit:
    """The planner's view of one unit: its size and arrival. Callers subclass it to carry their job."""

    __slots__ = ("arrival", "cancelled", "num_patches")

    def __init__(self, num_patches: int, arrival: float) -> None:
        self.num_patches = num_patches
        self.arrival = arrival
        self.cancelled = False


@dataclass(slots=True)
class _Bucket:
    units: deque[PlanUnit] = field(default_factory=deque)
    live_units: int = 0
    live_patches: int = 0

    def head(self) -> PlanUnit | None:
        """The oldest live unit; drops cancelled ones lazily (cancellation is O(1))."""
        while self.units and self.units[0].cancelled:
            self.units.popleft()
        return self.units[0] if self.units else None


class Planner:
    """Buckets pending units and cuts them into batches that respect the budget."""

    def __init__(self, *, ragged: bool, bytes_per_patch: int, budget_bytes: int, max_batch_items: int,
                 oom_backoff: float = 0.5) -> None:
        if bytes_per_patch <= 0 or budget_bytes <= 0 or max_batch_items <= 0:
            raise ValueError("bytes_per_patch, budget_bytes and max_batch_items must be positive")
        self.ragged = ragged
        self.bytes_per_patch = bytes_per_patch
        self.budget_bytes = budget_bytes
        self.max_batch_items = max_batch_items
        self.oom_backoff = oom_backoff
        self._buckets: dict[int, _Bucket] = {}
        self._shrunk_budget_patches: dict[int, int] = {}
        self._expedited: list[int] = []  # bucket keys, in the order their units were expedited
        self.pending_units = 0
        self.pending_patches = 0

    # --- sizes -------------------------------------------------------------------------------
    def bucket_of(self, num_patches: int) -> int:
        """Ragged towers mix sizes in one forward, so they have a single bucket (0)."""
        return 0 if self.ragged else num_patches

    @property
    def budget_patches(self) -> int:
        return self.budget_bytes // self.bytes_per_patch

    def bucket_budget_patches(self, bucket: int) -> int:
        return self._shrunk_budget_patches.get(bucket, self.budget_patches)

    def never_fits(self, num_patches: int) -> str | None:
        """Why a unit of this size can never run under the configured budget, or None if it can."""
        need = num_patches * self.bytes_per_patch
        if need > self.budget_bytes:
            return (f"{num_patches} patches x {self.bytes_per_patch} bytes/patch = {need} bytes "
                    f"exceeds the budget of {self.budget_bytes} bytes ({self.budget_patches} patches)")
        return None

    def shrink_budget(self, bucket: int, failed_patches: int) -> int:
        """After an out-of-memory forward of ``failed_patches``, lower this bucket's budget; returns it."""
        shrunk = max(1, int(failed_patches * self.oom_backoff))
        self._shrunk_budget_patches[bucket] = min(self.bucket_budget_patches(bucket), shrunk)
        return self._shrunk_budget_patches[bucket]

    # --- queue -------------------------------------------------------------------------------
    def add(self, units: Sequence[PlanUnit]) -> None:
        """Queue ``units`` (one request's, in order). Hot path: one call per request, locals only."""
        buckets, ragged, patches = self._buckets, self.ragged, 0
        for unit in units:
            key = 0 if ragged else unit.num_patches
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = _Bucket()
            bucket.units.append(unit)
            bucket.live_units += 1
            bucket.live_patches += unit.num_patches
            patches += unit.num_patches
        self.pending_units += len(units)
        self.pending_patches += patches

    def discard(self, unit: PlanUnit) -> None:
        """Withdraw a queued unit (its requester went away); it will never be planned."""
        if unit.cancelled:
            return
        unit.cancelled = True
        bucket = self._buckets[self.bucket_of(unit.num_patches)]
        bucket.live_units -= 1
        bucket.live_patches -= unit.num_patches
        self.pending_units -= 1
        self.pending_patches -= unit.num_patches

    def expedite(self, units: Sequence[PlanUnit]) -> None:
        """Someone is blocked on ``units``: move them to the front of their buckets (keeping their
        order) and dispatch those buckets before any other, whatever their age or fill."""
        by_bucket: dict[int, list[PlanUnit]] = {}
        for unit in {id(u): u for u in units}.values():  # a unit named twice moves once
            if not unit.cancelled:
                by_bucket.setdefault(self.bucket_of(unit.num_patches), []).append(unit)
        for key, moved in by_bucket.items():
            bucket = self._buckets.get(key)
            if bucket is None:
                continue
            queued = [u for u in moved if u in bucket.units]
            for unit in queued:
                bucket.units.remove(unit)
            bucket.units.extendleft(reversed(queued))
            if queued and key not in self._expedited:
                self._expedited.append(key)

    def __iter__(self) -> Iterator[PlanUnit]:
        """Live pending units, bucket by bucket, each bucket in arrival order."""
        for bucket in self._buckets.values():
            yield from (u for u in bucket.units if not u.cancelled)

    # --- planning ----------------------------------------------------------------------------
    def next_batch(self, now: float, max_wait: float, only_ready: bool = False) -> list[PlanUnit] | None:
        """Remove and return the next batch, or None if nothing is (ready to be) dispatched.

        With ``only_ready`` (the window policy) a bucket leaves only when it fills its budget or
        its oldest unit has aged; otherwise (the eager policy) the best bucket leaves at once.
        """
        key = self._choose_bucket(now, max_wait, only_ready)
        return None if key is None else self._take(key)

    def next_deadline(self, max_wait: float) -> float | None:
        """When the oldest pending unit ages: the latest a window-policy dispatcher may sleep to."""
        heads = [h.arrival for b in self._buckets.values() if (h := b.head()) is not None]
        return min(heads) + max_wait if heads else None

    def drain(self) -> list[list[PlanUnit]]:
        """Cut every pending unit into batches, in the order they would be dispatched.

        Used where the composition must be a pure function of the arrival sequence (lockstep mode
        under tensor parallelism): no aging, buckets in order of their oldest unit.
        """
        batches = []
        while self.pending_units:
            key = min((k for k, b in self._buckets.items() if b.live_units),
                      key=lambda k: self._buckets[k].head().arrival)
            batches.append(self._take(key))
        return batches

    def _choose_bucket(self, now: float, max_wait: float, only_ready: bool) -> int | None:
        while self._expedited:
            key = self._expedited[0]
            if key in self._buckets and self._buckets[key].head() is not None:
                return key
            self._expedited.pop(0)
        best_key, best_fill, aged_key, aged_arrival = None, -1.0, None, None
        for key, bucket in self._buckets.items():
            head = bucket.head()
            if head is None:
                continue
            if now - head.arrival >= max_wait and (aged_arrival is None or head.arrival < aged_arrival):
                aged_key, aged_arrival = key, head.arrival
            budget = self.bucket_budget_patches(key)
            fill = max(bucket.live_patches / budget, bucket.live_units / self.max_batch_items)
            if fill > best_fill:
                best_key, best_fill = key, fill
        if aged_key is not None:
            return aged_key
        if only_ready and best_fill < 1.0:
            return None
        return best_key

    def _take(self, key: int) -> list[PlanUnit]:
        bucket = self._buckets[key]
        budget = self.bucket_budget_patches(key)
        batch: list[PlanUnit] = []
        patches = 0
        while len(batch) < self.max_batch_items and (head := bucket.head()) is not None:
            if batch and patches + head.num_patches > budget:
                break
            bucket.units.popleft()
            batch.append(head)
            patches += head.num_patches
        bucket.live_units -= len(batch)
        bucket.live_patches -= patches
        self.pending_units -= len(batch)
        self.pending_patches -= patches
        if key in self._expedited:
            self._expedited.remove(key)
        if not bucket.live_units:
            del self._buckets[key]
        return batch
