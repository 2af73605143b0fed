"""Who holds which early-encoded result, the bytes they pin, and what to free or admit when.

Pure bookkeeping, like vLLM's ``encoder_cache_manager``: no torch, no threads, no clock. The
:class:`~mm_scheduler_sglang.service.EncoderService` calls it under its one lock and acts on what it returns
(cancel a handle whose last holder left, submit work that now fits).

* An *entry* is one encoded (or encoding) result, under the key that decides it, with the requests
  (``rid``) that still need it. It is freed when the last holder releases or consumes it.
* ``max_bytes`` caps what entries may pin. An item that does not fit is *deferred*, not dropped: it
  waits in arrival order and is admitted as soon as frees make room, so the cap is back-pressure
  that recovers, never a switch that turns early encoding off for good.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

H = TypeVar("H")
P = TypeVar("P")


@dataclass(eq=False)
class Entry(Generic[H]):
    handle: H
    nbytes: int
    holders: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Deferred(Generic[P]):
    """An item waiting for room under the cap; ``payload`` is what the service needs to submit it."""

    key: Hashable
    nbytes: int
    payload: P
    holders: set[str] = field(default_factory=set)


class HeldResults(Generic[H, P]):
    """Entries (submitted results) and deferrals (waiting for room), by key and by holder."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self._entries: dict[Hashable, Entry[H]] = {}
        self._deferred: dict[Hashable, Deferred[P]] = {}  # insertion order = admission order
        self._keys_of: dict[str, set[Hashable]] = {}

    # --- queries -----------------------------------------------------------------------------
    def entry(self, key: Hashable) -> Entry[H] | None:
        return self._entries.get(key)

    def is_deferred(self, key: Hashable) -> bool:
        return key in self._deferred

    def holds(self, rid: str, key: Hashable) -> bool:
        return key in self._keys_of.get(rid, ())

    def handles_of(self, rid: str) -> list[H] | None:
        """Handles of ``rid``'s held entries; None while one of its items is still deferred."""
        keys = self._keys_of.get(rid, ())
        if any(key in self._deferred for key in keys):
            return None
        return [self._entries[key].handle for key in keys if key in self._entries]

    def holders(self) -> set[str]:
        return set(self._keys_of)

    def keys(self) -> set[Hashable]:
        return set(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def deferred_count(self) -> int:
        return len(self._deferred)

    def fits(self, nbytes: int) -> bool:
        """Room for ``nbytes`` more, with nobody deferred ahead (admission stays in arrival order)."""
        return not self._deferred and self.held_bytes + nbytes <= self.max_bytes

    # --- holding -----------------------------------------------------------------------------
    def join(self, rid: str, key: Hashable) -> bool:
        """``rid`` needs the result already held or deferred under ``key``; False if there is none."""
        target = self._entries.get(key) or self._deferred.get(key)
        if target is None:
            return False
        target.holders.add(rid)
        self._keys_of.setdefault(rid, set()).add(key)
        return True

    def add(self, rid: str, key: Hashable, handle: H, nbytes: int) -> None:
        """A new result under ``key`` (the caller submitted it), held by ``rid``."""
        if key in self._entries or key in self._deferred:
            raise KeyError(f"{key!r} is already held or deferred")
        self._entries[key] = Entry(handle, nbytes, {rid})
        self.held_bytes += nbytes
        self._keys_of.setdefault(rid, set()).add(key)

    def defer(self, rid: str, key: Hashable, nbytes: int, payload: P) -> None:
        """No room for ``key`` now: queue it behind earlier deferrals until frees make room."""
        if key in self._entries or key in self._deferred:
            raise KeyError(f"{key!r} is already held or deferred")
        self._deferred[key] = Deferred(key, nbytes, payload, {rid})
        self._keys_of.setdefault(rid, set()).add(key)

    def admit(self) -> list[Deferred[P]]:
        """Deferrals that fit now, oldest first; they become entries once the caller calls :meth:`admitted`.

        Stops at the first that does not fit, so a large item is not overtaken forever by small
        ones. A deferral larger than ``max_bytes`` could never fit: it is dropped (its holders then
        encode at prefill) so it cannot block the ones behind it.
        """
        ready: list[Deferred[P]] = []
        reserved = self.held_bytes
        while self._deferred:
            first = next(iter(self._deferred.values()))
            if first.nbytes > self.max_bytes:
                self._drop_deferred(first)
                continue
            if reserved + first.nbytes > self.max_bytes:
                break
            reserved += first.nbytes
            del self._deferred[first.key]
            ready.append(first)
        return ready

    def admitted(self, deferred: Deferred[P], handle: H | None) -> None:
        """The caller submitted ``deferred`` (handle), or could not (None: its holders forget it)."""
        if handle is None:
            for rid in deferred.holders:
                self._forget(rid, deferred.key)
            return
        self._entries[deferred.key] = Entry(handle, deferred.nbytes, set(deferred.holders))
        self.held_bytes += deferred.nbytes

    # --- freeing -----------------------------------------------------------------------------
    def consume(self, rid: str, key: Hashable) -> H | None:
        """``rid`` will not ask for ``key`` again; returns the handle if that freed the entry."""
        if not self.holds(rid, key):
            return None
        self._forget(rid, key)
        return self._leave(rid, key)

    def release(self, rid: str) -> list[H]:
        """``rid`` finished, aborted or vanished: drop all its holds; returns the freed handles."""
        freed = []
        for key in self._keys_of.pop(rid, ()):
            handle = self._leave(rid, key)
            if handle is not None:
                freed.append(handle)
        return freed

    def clear(self) -> list[H]:
        """Forget everything (memory released by the server, shutdown); returns every handle."""
        handles = [e.handle for e in self._entries.values()]
        self._entries.clear()
        self._deferred.clear()
        self._keys_of.clear()
        self.held_bytes = 0
        return handles

    def _leave(self, rid: str, key: Hashable) -> H | None:
        deferred = self._deferred.get(key)
        if deferred is not None:
            deferred.holders.discard(rid)
            if not deferred.holders:
                del self._deferred[key]
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.holders.discard(rid)
        if entry.holders:
            return None
        del self._entries[key]
        self.held_bytes -= entry.nbytes
        return entry.handle

    def _forget(self, rid: str, key: Hashable) -> None:
        keys = self._keys_of.get(rid)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys_of[rid]

    def _drop_deferred(self, deferred: Deferred[P]) -> None:
        del self._deferred[deferred.key]
        for rid in deferred.holders:
            self._forget(rid, deferred.key)
