"""TP>1: every rank runs exactly the batches the submit sequence dictates, whatever each rank's timing.

Two processes (torch.distributed, gloo, CPU) play two TP ranks. Both submit the same request
sequence and consume results at the same points of it, as SGLang's schedulers do (they see the same
broadcast requests and run the same batches), but with adversarial timing: rank 0 never sleeps,
rank 1 sleeps 0-50 ms at random before submits and steps, far beyond any batching window. Each
rank's forwards are compared with batches computed here from the sequence alone (a model of the
lockstep contract on top of :meth:`Planner.drain` / ``next_batch(inf, 0)``), so an encoder that cut
batches by a clock (arrival times, a window policy) fails even when both ranks happen to agree.

The fake tower all-reduces a fixed-shape fingerprint of its batch: mismatched batches show up as a
wrong sum instead of a gloo hang; a short gloo timeout and per-rank error reporting keep failures fast.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import socket
import time
import traceback
import zlib
from datetime import timedelta

import torch

from mm_scheduler import CoalescerConfig, EncodeItem
from mm_scheduler.planner import Planner, PlanUnit
from mm_scheduler.units import split_into_units

WORLD = 2
SIZES = (16, 32, 64)
REQUESTS = 150
BYTES_PER_PATCH = 1024
BUDGET = 160 * BYTES_PER_PATCH
MAX_ITEMS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fingerprint(units) -> list[float]:
    """Batch identity as a fixed-shape vector (exact in float64): counts, patches, a key checksum."""
    checksum = sum((i + 1) * (zlib_key(u.key) % 9973) for i, u in enumerate(units))
    return [float(len(units)), float(sum(u.num_patches for u in units)), float(checksum)]


def zlib_key(key) -> int:
    return zlib.crc32(repr(key).encode())


class CollectiveTower:
    """Uniform-batch tower whose forward all-reduces its batch's fingerprint."""

    ragged = False
    bytes_per_patch = BYTES_PER_PATCH
    device = "cpu"

    def __init__(self) -> None:
        self.log: list[tuple[tuple, tuple[int, ...]]] = []
        self.peer_mismatches = 0

    def forward(self, units):
        import torch.distributed as dist

        mine = torch.tensor(fingerprint(units), dtype=torch.float64)
        total = mine.clone()
        dist.all_reduce(total)
        if not torch.equal(total, mine * WORLD):  # the other rank ran a different batch
            self.peer_mismatches += 1
        self.log.append((tuple(u.key for u in units), tuple(u.num_patches for u in units)))
        return [u.pixel_values.sum(dim=-1) for u in units]


def request_sequence(n: int = REQUESTS) -> list[list[EncodeItem]]:
    """The same on every rank: mixed sizes, some videos, some content keys repeated across requests."""
    rng = random.Random(0)
    sequence = []
    for r in range(n):
        items = []
        for i in range(rng.randint(1, 3)):
            shared = rng.randrange(12) if rng.random() < 0.3 else None
            key = (r, i) if shared is None else shared
            patches = rng.choice(SIZES) if shared is None else SIZES[shared % len(SIZES)]
            value = float(zlib_key(key) % 89)
            if rng.random() < 0.2:
                frames = rng.randint(2, 4)
                items.append(EncodeItem(torch.full((frames, patches, 4), value), patches, "video", ("v", key)))
            else:
                items.append(EncodeItem(torch.full((patches, 4), value), patches, "image", key))
        sequence.append(items)
    return sequence


def script(n: int = REQUESTS) -> list[tuple[str, int]]:
    """The host loop, identical on every rank: submit, abort some, prefill earlier requests, step."""
    ops: list[tuple[str, int]] = []
    cancelled: set[int] = set()
    for index in range(n):
        ops.append(("submit", index))
        if index % 7 == 3:  # a request aborted while queued
            ops.append(("cancel", index))
            cancelled.add(index)
        if index % 5 == 4 and index - 2 not in cancelled:  # a prefill needs an earlier request
            ops.append(("result", index - 2))
        if index % 9 == 8:  # a fixed step point of the scheduler loop
            ops.append(("step", -1))
    ops.extend(("result", i) for i in range(n) if i not in cancelled)
    return ops


class _Unit(PlanUnit):
    __slots__ = ("holders", "key")

    def __init__(self, unit: EncodeItem, arrival: float) -> None:
        super().__init__(unit.num_patches, arrival)
        self.key = unit.key
        self.holders: set[int] = set()


def expected_forwards(sequence, ops) -> list[tuple[tuple, tuple[int, ...]]]:
    """The lockstep contract, from the sequence alone: dedup of queued keys, step = drain, result =
    queue-order batches until the request's units have all run."""
    planner = Planner(ragged=False, bytes_per_patch=BYTES_PER_PATCH, budget_bytes=BUDGET, max_batch_items=MAX_ITEMS)
    queued: dict = {}
    pending: dict[int, set[_Unit]] = {}
    forwards = []
    arrivals = 0

    def run(batch) -> None:
        forwards.append((tuple(u.key for u in batch), tuple(u.num_patches for u in batch)))
        for u in batch:
            if queued.get(u.key) is u:
                del queued[u.key]
            for holder in u.holders:
                pending[holder].discard(u)
            u.holders = set()

    for op, index in ops:
        if op == "submit":
            pending[index] = set()
            for unit in split_into_units(sequence[index])[0]:
                job = queued.get(unit.key) if unit.key is not None else None
                if job is None:
                    job = _Unit(unit, float(arrivals))
                    arrivals += 1
                    planner.add([job])
                    if unit.key is not None:
                        queued[unit.key] = job
                job.holders.add(index)
                pending[index].add(job)
        elif op == "cancel":
            for job in pending.pop(index):
                job.holders.discard(index)
                if not job.holders:
                    planner.discard(job)
                    if queued.get(job.key) is job:
                        del queued[job.key]
        elif op == "step":
            for batch in planner.drain():
                run(batch)
        else:
            while pending[index] and planner.pending_units:
                run(planner.next_batch(math.inf, 0.0))
    return forwards


def rank_main(rank: int, port: int, results) -> None:
    try:
        import torch.distributed as dist

        from mm_scheduler.lockstep import LockstepEncoder

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=30))
        tower = CollectiveTower()
        encoder = LockstepEncoder(tower, CoalescerConfig(budget_bytes=BUDGET, max_batch_items=MAX_ITEMS))
        jitter = random.Random(1000 + rank)
        sequence = request_sequence()
        tickets, outputs = {}, {}
        for op, index in script():
            if rank == 1 and op in ("submit", "step") and jitter.random() < 0.4:
                time.sleep(jitter.uniform(0, 0.05))  # rank 0 never sleeps
            if op == "submit":
                tickets[index] = encoder.submit(sequence[index])
            elif op == "cancel":
                encoder.cancel(tickets[index])
            elif op == "step":
                encoder.step()
            else:
                outputs[index] = [t.tolist() for t in encoder.result(tickets[index])]
        results.put((rank, tower.log, tower.peer_mismatches, outputs, None))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, None, None, None, traceback.format_exc()))


def run_ranks(target, *args) -> dict[int, list]:
    """Run ``target(rank, port, results, *args)`` in one spawned process per rank; each puts
    ``(rank, *values, error_or_None)``. A rank that reports an error or nothing within 120 s fails the test."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, results, *args), daemon=True) for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        got = {}
        for _ in range(WORLD):
            rank, *rest = results.get(timeout=120)  # watchdog: a hung rank fails the test
            got[rank] = rest
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [err for *_, err in got.values() if err]
    assert not errors, "\n".join(errors)
    return got


def test_every_rank_runs_the_batches_the_submit_sequence_dictates_under_adversarial_timing():
    sequence, ops = request_sequence(), script()
    expected = expected_forwards(sequence, ops)
    got = run_ranks(rank_main)
    (log0, mismatches0, outs0, _), (log1, mismatches1, outs1, _) = got[0], got[1]
    assert len(expected) > 40 and any(len(keys) > 1 for keys, _ in expected)  # real batching in the model
    assert log0 == expected
    assert log1 == expected
    assert mismatches0 == mismatches1 == 0  # every forward's all-reduce met the same batch on the peer
    for _, patches in expected:  # uniform tower: one patch count per batch, under the budget
        assert len(set(patches)) == 1 and sum(patches) * BYTES_PER_PATCH <= BUDGET
    assert outs0 == outs1
    for index, items in enumerate(sequence):  # values: each item's own pixels, nothing mixed up
        if index in outs0:
            for item, out in zip(items, outs0[index], strict=True):  # video frames concatenated
                assert torch.equal(torch.tensor(out), item.pixel_values.sum(dim=-1).reshape(-1))
    cancelled = {i for i in range(REQUESTS) if i % 7 == 3}
    assert set(outs0) == set(range(REQUESTS)) - cancelled
