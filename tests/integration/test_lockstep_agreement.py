"""TP>1: a failure on one rank only is agreed by all ranks, so all take the same fallback and none hangs.

Two processes (gloo, CPU) play two TP ranks running the same host loop, modelled on the plugin's
``EncoderService.encode``: take the early result; on an encode error encode on demand; on a second
error call the model's own method. The model's method and the tower both issue collectives, so a
rank that took a different path than its peer would leave a collective unmatched (a wrong sum, a
gloo error or, with NCCL, a hang). Failures are injected on rank 1 only: an out-of-memory in the
preflight (before the tower's first collective) and an exception after the tower's collective.
Agreement runs over a separate gloo group, as the plugin runs it over SGLang's TP CPU group.
A 30 s gloo timeout and the 120 s result watchdog turn any hang into a failure.
"""

from __future__ import annotations

import random
import time
import traceback
from datetime import timedelta

import pytest
import torch
from test_lockstep_tp import WORLD, fingerprint, run_ranks

from mm_scheduler import CoalescerConfig, EncodeError, EncodeItem

REQUESTS = 60
PATCHES = (16, 32)


def sizes() -> list[int]:
    rng = random.Random(0)
    return [rng.choice(PATCHES) for _ in range(REQUESTS)]


class FaultyCollectiveTower:
    """Each forward all-reduces its batch fingerprint; faults fire on ``fault_rank`` only."""

    ragged = True
    bytes_per_patch = 1024
    device = "cpu"

    def __init__(self, rank: int, fault: str, fault_keys: set, fault_rank: int = 1) -> None:
        self.rank = rank
        self.fault = fault if rank == fault_rank else "none"
        self.fault_keys = fault_keys
        self.log: list[tuple] = []
        self.peer_mismatches = 0

    def preflight(self, units) -> None:
        if self.fault == "oom" and any(u.key in self.fault_keys for u in units):
            raise torch.OutOfMemoryError("injected: CUDA out of memory on rank 1")

    def forward(self, units):
        import torch.distributed as dist

        mine = torch.tensor(fingerprint(units), dtype=torch.float64)
        total = mine.clone()
        dist.all_reduce(total)  # the tower's collective: both ranks must be here with the same batch
        if not torch.equal(total, mine * WORLD):
            self.peer_mismatches += 1
        self.log.append(tuple(u.key for u in units))
        if self.fault == "raise" and any(u.key in self.fault_keys for u in units):
            raise RuntimeError("injected: failure after the collective on rank 1")
        return [u.pixel_values.sum(dim=-1) for u in units]


def model_own_method(item: EncodeItem) -> torch.Tensor:
    """SGLang's fallback: its own encoder, with its own collective (a shape the tower never uses)."""
    import torch.distributed as dist

    probe = torch.ones(7)
    dist.all_reduce(probe)
    assert float(probe[0]) == WORLD
    return item.pixel_values.sum(dim=-1)


def rank_main(rank: int, port: int, results, fault: str, fault_keys: set, agreement: bool) -> None:
    try:
        import torch.distributed as dist

        from mm_scheduler.lockstep import LockstepEncoder, process_group_agree

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=timedelta(seconds=30))
        agree_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=30))
        tower = FaultyCollectiveTower(rank, fault, fault_keys)
        encoder = LockstepEncoder(tower, CoalescerConfig(budget_bytes=96 * 1024, max_batch_items=4),
                                  agree=process_group_agree(agree_group) if agreement else None)
        jitter = random.Random(rank)
        items = [EncodeItem(torch.full((n, 2), float(i)), n, "image", i) for i, n in enumerate(sizes())]
        paths, values = [], []
        tickets = {}
        for i, item in enumerate(items):
            if jitter.random() < 0.3:
                time.sleep(jitter.uniform(0, 0.01))
            tickets[i] = encoder.submit([item])  # arrival: encode early
            if i % 3 != 2:
                continue
            for j in (i - 2, i - 1, i):  # a prefill of three requests, as EncoderService.encode does
                try:
                    out, path = encoder.result(tickets[j])[0], "early"
                except EncodeError:
                    try:
                        out, path = encoder.result(encoder.submit([items[j]]))[0], "on_demand"
                    except EncodeError:
                        out, path = model_own_method(items[j]), "fallback"
                paths.append(path)
                values.append(out.tolist())
        results.put((rank, paths, values, tower.log, tower.peer_mismatches, encoder.agreed_failures, None))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, None, None, None, None, None, traceback.format_exc()))


def check_same_paths(got: dict) -> list[str]:
    (paths0, values0, log0, mism0, agreed0), (paths1, values1, log1, mism1, agreed1) = got[0][:5], got[1][:5]
    assert paths0 == paths1  # both ranks took the same path for every item
    assert log0 == log1 and mism0 == mism1 == 0  # and issued the same tower collectives
    assert agreed0 == agreed1 > 0
    assert values0 == values1 == [torch.full((n,), 2.0 * i).tolist() for i, n in enumerate(sizes())]
    return paths0


@pytest.mark.parametrize("fault", ["oom", "raise"])
def test_a_persistent_failure_on_one_rank_sends_every_rank_to_the_models_own_method(fault):
    bad = {4, 17, 31}
    paths = check_same_paths(run_ranks(rank_main, fault, bad, True))
    assert {i for i, p in enumerate(paths) if p == "fallback"} == bad
    # The bad items' batch-mates failed with them (a lockstep batch fails whole) and were re-encoded.
    assert {p for i, p in enumerate(paths) if i not in bad} == {"early", "on_demand"}


class FailsOnce(set):
    """Fault keys that fire once each (a transient OOM)."""

    def __contains__(self, key) -> bool:
        hit = super().__contains__(key)
        if hit:
            self.discard(key)
        return hit


def test_a_transient_oom_on_one_rank_is_retried_on_demand_by_every_rank():
    paths = check_same_paths(run_ranks(rank_main, "oom", FailsOnce({9}), True))
    # The early batch holding key 9 failed everywhere; each of its items was encoded on demand.
    assert "fallback" not in paths and paths[9] == "on_demand"
