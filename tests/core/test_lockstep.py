"""The deterministic (tensor-parallel) front end: no clock, no thread, batches cut by the planner."""

from __future__ import annotations

import random
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from mm_scheduler import CoalescerConfig, EncodeError, EncodeItem, InvalidItemError, metrics
from mm_scheduler.lockstep import LockstepEncoder, PeerFailedError
from mm_scheduler.testing import FakeTower, expected_encoding

from .helpers import image, video


def encoder(tower: FakeTower, agree=None, **overrides) -> LockstepEncoder:
    config = CoalescerConfig(**{"max_batch_items": 4, "budget_bytes": 1024 * 200, **overrides})
    return LockstepEncoder(tower, config, agree=agree)


def test_nothing_runs_until_step_and_then_everything_queued_runs():
    tower = FakeTower()
    enc = encoder(tower)
    items = [image(16), image(64), video(3, 16)]
    ticket = enc.submit(items)
    assert tower.log == [] and not ticket.done()
    assert enc.step() == len(tower.log) > 0
    assert ticket.done() and enc.pending_units == 0
    for item, out in zip(items, enc.result(ticket), strict=True):
        assert torch.equal(out, expected_encoding(item))


def test_step_cuts_batches_by_submit_order_alone():
    """Expected batches worked out by hand from the sequence (budget 200 patches, 4 items per batch)."""
    tower = FakeTower()
    enc = encoder(tower)
    for key, n in enumerate((16, 64, 16, 16, 144, 64, 16, 16)):
        enc.submit([EncodeItem(torch.ones(2) * n, n, key=key)])
    assert enc.step() == 4
    # The oldest unit's bucket first (16: keys 0, 2, 3, 6, capped at 4 items), then 64 (head key 1),
    # then 144 (key 4), then what is left of 16 (key 7). No clock: the same cuts on every run, any timing.
    assert [r.keys for r in tower.log] == [(0, 2, 3, 6), (1, 5), (4,), (7,)]
    assert [r.patch_counts for r in tower.log] == [(16,) * 4, (64, 64), (144,), (16,)]


def test_result_runs_queue_order_batches_until_its_ticket_is_done():
    tower = FakeTower()
    enc = encoder(tower)
    tickets = [enc.submit([EncodeItem(torch.ones(2) * n, n, key=key)]) for key, n in enumerate((16, 64, 16, 64, 144))]
    enc.result(tickets[1])
    assert [r.keys for r in tower.log] == [(0, 2), (1, 3)]  # stops before key 4's batch
    assert enc.pending_units == 1 and not tickets[4].done()


def test_result_runs_a_step_when_the_ticket_is_not_done():
    enc = encoder(FakeTower())
    item = image(16)
    ticket = enc.submit([item])
    assert torch.equal(enc.result(ticket)[0], expected_encoding(item))


def test_equal_keys_encode_once_and_cancel_keeps_work_for_other_holder():
    tower = FakeTower()
    enc = encoder(tower)
    shared = image(16, key="h")
    first, second = enc.submit([shared]), enc.submit([shared])
    enc.cancel(first)
    assert enc.pending_units == 1
    assert torch.equal(enc.result(second)[0], expected_encoding(shared))
    assert sum(r.keys.count("h") for r in tower.log) == 1


def test_cancelling_a_ticket_after_its_batch_ran_leaves_the_queue_intact():
    tower = FakeTower()
    enc = encoder(tower)
    done = enc.submit([image(16, key="ran")])
    enc.step()
    queued_item = image(16, key="queued")
    queued = enc.submit([queued_item])
    enc.cancel(done)  # an abort arriving after the encode (the service cancels on every abort)
    assert enc.pending_units == 1
    assert torch.equal(enc.result(queued)[0], expected_encoding(queued_item))
    assert enc.pending_units == 0 and enc.step() == 0


def test_cancelled_ticket_units_never_reach_the_tower():
    tower = FakeTower()
    enc = encoder(tower)
    enc.cancel(enc.submit([image(16, key="gone")]))
    assert enc.step() == 0 and tower.log == []


def test_invalid_item_is_rejected_at_submit_and_nothing_is_queued():
    enc = encoder(FakeTower(), budget_bytes=1024 * 100)
    with pytest.raises(InvalidItemError, match="item 1: can never be encoded"):
        enc.submit([image(16), image(101)])
    assert enc.pending_units == 0


def test_failed_forward_fails_that_batch_and_later_batches_still_run():
    tower = FakeTower(fail_keys={"bad"})
    enc = encoder(tower)
    bad = enc.submit([image(16, key="bad")])
    enc.step()
    with pytest.raises(EncodeError, match="lockstep batch"):
        enc.result(bad)
    good_item = image(16)
    assert torch.equal(enc.result(enc.submit([good_item]))[0], expected_encoding(good_item))


def test_a_failed_ticket_withdraws_its_queued_units_that_no_other_ticket_waits_for():
    """A CI soak left 2 units queued for good: a ticket failed on its first batch, result() raised, and its other
    units stayed queued for a reader that had gone (nothing steps a lockstep queue but a prefill)."""
    tower = FakeTower(fail_keys={"bad"})
    enc = encoder(tower)
    failed = enc.submit([image(16, key="bad"), image(144, key="alone"), image(64, key="shared")])
    other = enc.submit([image(64, key="shared")])
    with pytest.raises(EncodeError, match="lockstep batch"):
        enc.result(failed)
    assert [r.keys for r in tower.log] == [("bad",)]  # the failure came first; the rest had not run
    assert enc.pending_units == 1  # "alone" is withdrawn; "shared" stays for the other ticket
    assert enc.result(other)[0].shape[0] == 64
    assert [r.keys for r in tower.log] == [("bad",), ("shared",)] and enc.pending_units == 0


class ScriptedPeers:
    """An ``agree`` for one process: records what this rank said, answers as if peers said ``peer``."""

    def __init__(self, peer: list[bool]) -> None:
        self.peer = list(peer)
        self.said: list[bool] = []

    def __call__(self, failed: bool) -> bool:
        self.said.append(failed)
        return failed or self.peer.pop(0)


class PreflightTower(FakeTower):
    def __init__(self, oom_keys: set, **kwargs) -> None:
        super().__init__(**kwargs)
        self.oom_keys = oom_keys
        self.preflights = 0

    def preflight(self, units) -> None:
        self.preflights += 1
        if any(u.key in self.oom_keys for u in units):
            raise torch.OutOfMemoryError("injected")


def test_a_peer_failing_the_forward_fails_the_batch_here_too():
    tower = FakeTower()
    peers = ScriptedPeers([False, True])  # preflight fine everywhere, a peer's forward failed
    enc = encoder(tower, agree=peers)
    ticket = enc.submit([image(16)])
    enc.step()
    assert len(tower.log) == 1 and peers.said == [False, False]
    with pytest.raises(EncodeError) as info:
        enc.result(ticket)
    assert isinstance(info.value.__cause__, PeerFailedError)
    assert enc.agreed_failures == 1


def test_a_peer_failing_preflight_skips_the_forward_on_this_rank():
    tower = FakeTower()
    peers = ScriptedPeers([True])
    enc = encoder(tower, agree=peers)
    ticket = enc.submit([image(16)])
    enc.step()
    assert tower.log == [] and peers.said == [False]
    with pytest.raises(EncodeError):
        enc.result(ticket)


def test_local_preflight_oom_is_told_to_peers_before_any_forward_and_later_batches_run():
    tower = PreflightTower(oom_keys={"big"})
    peers = ScriptedPeers([False, False, False])
    enc = encoder(tower, agree=peers)
    bad = enc.submit([image(144, key="big")])
    good_item = image(16)
    good = enc.submit([good_item])
    enc.step()
    assert peers.said == [True, False, False]  # preflight(big) failed; then good's preflight and forward
    assert [r.keys for r in tower.log] == [(good_item.key,)]
    with pytest.raises(EncodeError) as info:
        enc.result(bad)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert torch.equal(enc.result(good)[0], expected_encoding(good_item))


def test_local_forward_failure_is_told_to_peers():
    peers = ScriptedPeers([False, False])
    enc = encoder(FakeTower(fail_keys={"bad"}), agree=peers)
    enc.submit([image(16, key="bad")])
    enc.step()
    assert peers.said == [False, True]


def test_without_agreement_no_preflight_runs():
    tower = PreflightTower(oom_keys={"big"})
    enc = encoder(tower)
    assert enc.result(enc.submit([image(144, key="big")]))
    assert tower.preflights == 0 and len(tower.log) == 1


def test_threads_submitting_shared_keys_while_others_run_batches_all_get_every_output():
    """CI caught a submit joining a unit whose batch had just delivered: its ticket waited forever for that slot
    and ``result`` handed back None. Eight threads share twelve keys, cancel a quarter of their tickets and take
    turns in ``result`` (as the plugin's prefill does); a short switch interval makes the interleavings common."""
    enc = encoder(FakeTower())
    errors: list[BaseException] = []
    result_turn = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                items = [EncodeItem(torch.ones(2) * k, 16, key=k) for k in rng.sample(range(12), rng.randint(1, 3))]
                ticket = enc.submit(items)
                if rng.random() < 0.25:
                    enc.cancel(ticket)
                    continue
                with result_turn:
                    outputs = enc.result(ticket)
                for item, out in zip(items, outputs, strict=True):
                    assert out is not None and torch.equal(out, expected_encoding(item)), item.key
        except BaseException as exc:
            errors.append(exc)

    _run_threads(client, 8)
    assert not errors, errors[0]
    assert enc.pending_units == 0


def test_the_first_metric_used_from_many_threads_at_once_registers_each_series_once(monkeypatch):
    """Without the first-use lock two threads' first calls both registered, and the second raised 'Duplicated
    timeseries'. Registering is made slow so that every thread arrives while the first registers; the process's
    series are set aside for the test and put back after it."""
    from prometheus_client import REGISTRY

    original = metrics._series()
    register = metrics._register

    def slow_register():
        time.sleep(0.05)
        return register()

    monkeypatch.setattr(metrics, "_register", slow_register)
    with metrics._FIRST_USE:
        for collector in vars(original).values():
            REGISTRY.unregister(collector)
        metrics._registered = None
    seen: list[object] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def first_use(_: int) -> None:
        start.wait()
        try:
            seen.append(metrics.UNITS)
        except BaseException as exc:
            errors.append(exc)

    try:
        _run_threads(first_use, 8)
    finally:
        with metrics._FIRST_USE:
            for collector in vars(metrics._registered or SimpleNamespace()).values():
                REGISTRY.unregister(collector)
            for collector in vars(original).values():
                REGISTRY.register(collector)
            metrics._registered = original
    assert not errors, errors[0]
    assert len(seen) == 8 and all(series is seen[0] for series in seen)


def _run_threads(target, count: int) -> None:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=target, args=(seed,), daemon=True) for seed in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads), "a thread is stuck (a deadlock?)"
    finally:
        sys.setswitchinterval(previous)
