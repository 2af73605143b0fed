"""The coalescer's bookkeeping: a request (one ``encode()`` call) and a job (one distinct unit of work that
several requests may wait on). Plain data with the few methods the hot path needs; the loop is in coalescer.py."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable

import torch

from .planner import PlanUnit
from .types import EncodeItem


class Request:
    """One ``encode()`` call: where its units' outputs go, and the future its caller awaits."""

    __slots__ = ("events", "future", "jobs", "outputs", "remaining", "seq")

    def __init__(self, seq: int, future: asyncio.Future[None], num_units: int) -> None:
        self.seq = seq
        self.future = future
        self.outputs: list[torch.Tensor | None] = [None] * num_units
        self.remaining = num_units
        self.jobs: list[Job] = []
        self.events: list[torch.cuda.Event] = []  # handover: enqueued: what the outputs' consumer must wait for


class Job(PlanUnit):
    """One distinct unit of work, queued in the planner; several requests wait on it when keys match.

    The first waiter is stored inline and only dedup hits allocate ``more_waiters``: this object is
    created once per unit, and fewer allocations mean fewer garbage-collector passes on the hot path.
    """

    __slots__ = ("key", "more_waiters", "request", "running", "slot", "unit")

    def __init__(self, unit: EncodeItem, key: Hashable | None, arrival: float, request: Request, slot: int) -> None:
        self.num_patches = unit.num_patches  # PlanUnit's fields, set inline: this runs once per unit
        self.arrival = arrival
        self.cancelled = False
        self.unit = unit
        self.key = key
        self.request: Request | None = request
        self.slot = slot
        self.more_waiters: list[tuple[Request, int]] | None = None
        self.running = False

    def waiters(self) -> list[tuple[Request, int]]:
        first = [] if self.request is None else [(self.request, self.slot)]
        return first + self.more_waiters if self.more_waiters else first

    def add_waiter(self, request: Request, slot: int) -> None:
        if self.request is None:
            self.request, self.slot = request, slot
        elif self.more_waiters is None:
            self.more_waiters = [(request, slot)]
        else:
            self.more_waiters.append((request, slot))

    def remove_waiter(self, request: Request) -> None:
        if self.request is request:
            self.request = None
        if self.more_waiters:
            self.more_waiters = [w for w in self.more_waiters if w[0] is not request]

    def has_waiters(self) -> bool:
        return self.request is not None or bool(self.more_waiters)
