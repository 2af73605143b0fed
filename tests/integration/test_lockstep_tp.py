"""TP>1: the lockstep encoder issues identical collectives on every rank, whatever the timing.

Two processes (torch.distributed, gloo, CPU) play two TP ranks. Both submit the same request
sequence, each with its own random sleeps, and consume results at the same points of the sequence,
as SGLang's schedulers do (they see the same broadcast requests and run the same batches). The fake
tower all-reduces a tensor whose shape depends on the batch, so ranks that cut different batches
would fail or hang; a timeout turns a hang into a failure.
"""

from __future__ import annotations

import multiprocessing as mp
import random
import time
from datetime import timedelta

import sglang_models as sm
import torch

from mm_scheduler import CoalescerConfig, EncodeItem

WORLD = 2
SIZES = (16, 32, 64)


class CollectiveTower:
    """Uniform-batch tower whose forward runs one all_reduce shaped by the batch."""

    ragged = False
    bytes_per_patch = 1024
    device = "cpu"

    def __init__(self) -> None:
        self.log: list[tuple[tuple, tuple[int, ...], float]] = []

    def forward(self, units):
        import torch.distributed as dist

        shape = (len(units), sum(u.num_patches for u in units))
        probe = torch.full(shape, float(dist.get_rank() + 1))
        dist.all_reduce(probe)  # shapes differ between ranks => gloo raises or hangs
        self.log.append((tuple(u.key for u in units), tuple(u.num_patches for u in units), float(probe[0, 0])))
        return [u.pixel_values.sum(dim=-1, keepdim=True) + probe[0, 0] for u in units]


def request_sequence(n: int = 40) -> list[list[EncodeItem]]:
    """The same on every rank: mixed sizes, some videos, some repeated content keys."""
    rng = random.Random(0)
    sequence = []
    for r in range(n):
        items = []
        for i in range(rng.randint(1, 3)):
            shared = rng.randrange(12) if rng.random() < 0.3 else None  # content seen in other requests
            key = (r, i) if shared is None else shared
            patches = rng.choice(SIZES) if shared is None else SIZES[shared % len(SIZES)]
            if rng.random() < 0.2:
                frames = rng.randint(2, 4)
                pixels = torch.full((frames, patches, 4), float(hash(key) % 97))
                items.append(EncodeItem(pixels, patches, "video", ("v", key)))
            else:
                items.append(EncodeItem(torch.full((patches, 4), float(hash(key) % 89)), patches, "image", key))
        sequence.append(items)
    return sequence


def rank_main(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from mm_scheduler.lockstep import LockstepEncoder

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    tower = CollectiveTower()
    encoder = LockstepEncoder(tower, CoalescerConfig(budget_bytes=160 * 1024, max_batch_items=5))
    jitter = random.Random(1000 + rank)  # different timing on every rank
    tickets, outputs = [], {}
    for index, items in enumerate(request_sequence()):
        time.sleep(jitter.uniform(0, 0.004))
        tickets.append(encoder.submit(items))
        if index % 7 == 3:  # a request aborted while queued, at the same point everywhere
            encoder.cancel(tickets[index])
        if index % 5 == 4:  # a prefill needs an earlier request's results
            want = index - 2
            if not tickets[want].cancelled:
                outputs[want] = [t.tolist() for t in encoder.result(tickets[want])]
        if index % 9 == 8:  # a fixed step point of the scheduler loop
            encoder.step()
    for index, ticket in enumerate(tickets):
        if not ticket.cancelled:
            outputs[index] = [t.tolist() for t in encoder.result(ticket)]
    dist.barrier()
    results.put((rank, tower.log, outputs))
    dist.destroy_process_group()


def test_ranks_issue_identical_encoder_collectives_despite_timing_jitter():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = sm.free_port()
    procs = [ctx.Process(target=rank_main, args=(rank, port, results), daemon=True) for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        got = dict((rank, (log, outs)) for rank, log, outs in (results.get(timeout=120) for _ in range(WORLD)))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    (log0, outs0), (log1, outs1) = got[0], got[1]
    assert log0 == log1
    assert len(log0) > 10 and any(len(keys) > 1 for keys, _, _ in log0)  # real batching happened
    assert all(value == 3.0 for _, _, value in log0)  # every forward's all_reduce summed both ranks
    for _, patches, _ in log0:  # uniform tower: one patch count per batch, under the budget
        assert len(set(patches)) == 1 and sum(patches) * CollectiveTower.bytes_per_patch <= 160 * 1024
    assert outs0 == outs1
    cancelled = {i for i in range(40) if i % 7 == 3}
    assert set(outs0) == set(range(40)) - cancelled
