"""The soak through EncoderService from SGLang's thread model, short (``make soak`` runs 10,000 requests).

One scheduler thread calls the service's hooks in SGLang's order, client threads feed it, every fault of
:mod:`mm_scheduler.soak` is on (see :mod:`mm_scheduler_sglang.soak_driver`). The defects it found are pinned here
by small tests of their own: a duplicate expedite, a fallback or a health probe waiting on a hung forward's
tower lock, a malformed lockstep output escaping encode().
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from mm_scheduler_sglang.service import EncoderService
from mm_scheduler_sglang.soak_driver import LockstepServiceDriver, ServiceDriver

from mm_scheduler import CoalescerConfig
from mm_scheduler.soak import SoakSettings, format_table, run_soak

from .test_service import (  # noqa: F401 (fixture)
    SumTower,
    _eventually,
    _start_thread,
    expected,
    item,
    make_service,
    never,
)


@pytest.mark.stress
def test_service_soak_from_the_scheduler_thread_loses_nothing_and_never_blocks_it_unbounded():
    settings = SoakSettings(requests=2000, clients=200, seed=11, hang_at=0.3)
    report = asyncio.run(run_soak(settings, ServiceDriver()))  # once: the service runs its own loop
    figures = report["figures"]
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert failed == [], f"{failed}\n{format_table(report)}"
    assert figures["ok"] > settings.requests // 2 and figures["cancelled"] > 0
    assert figures["early_items"] > 0 and figures["on_demand_items"] > 0 and figures["fallback_calls"] > 0
    assert figures["shared_items"] > 0 and figures["deferred_items"] > 0 and figures["withdrawn"] > 0
    assert figures["vanished"] > 0 and figures["swept"] > 0  # one may have held nothing
    assert figures["hung_forwards"] == 1 and figures["forward_timeouts"] == 1 and figures["oom_backoffs"] > 0


@pytest.mark.stress
def test_service_soak_in_lockstep_mode_loses_nothing_and_leaves_nothing_held():
    settings = SoakSettings(requests=1000, clients=100, seed=12, hang_at=None)  # lockstep forwards have no deadline
    report = asyncio.run(run_soak(settings, LockstepServiceDriver()))
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert failed == [], f"{failed}\n{format_table(report)}"
    assert report["figures"]["ok"] > settings.requests // 2


class ListTower(SumTower):
    """Returns a list, not a tensor, for every unit (a broken tower; the soak's malformed images)."""

    def forward(self, units):
        return [out.tolist() for out in super().forward(units)]


def test_a_lockstep_tower_returning_a_non_tensor_falls_back_instead_of_raising_from_encode(make_service):  # noqa: F811
    service = make_service(lockstep=True, tower=ListTower())
    service.on_arrival("r", [item(3)])
    assert service.encode([item(3)], original=lambda items: "sglang's own") == "sglang's own"


def test_a_prefill_needing_one_queued_item_twice_keeps_the_coalescer_serving(make_service):  # noqa: F811
    """Two requests of one prefill batch share an image: expedite gets its queued unit twice."""
    service = make_service()
    service.tower.gate.clear()
    service.on_arrival("busy", [item(99)])
    _eventually(service.tower.in_forward.is_set, "the tower to be busy")
    service.on_arrival("a", [item(7)])
    service.on_arrival("b", [item(7)])  # shared: one queued unit, one handle
    prefill, result = _start_thread(service.encode, [item(7), item(7)], never)
    # The duplicate expedite must really happen while the unit is queued (the gate holds the tower).
    _eventually(lambda: service.stats()["expedited_units"] >= 1, "the prefill to expedite the queued unit")
    assert service.stats()["pending_units"] == 1
    service.tower.gate.set()
    prefill.join(30)
    assert "error" not in result, result.get("error")
    assert torch.equal(result["value"], expected(7, 7))
    assert service.stats()["closed"] is False
    assert torch.equal(service.encode([item(8)], original=never), expected(8))  # the dispatcher still serves


def test_a_fallback_while_a_forward_hangs_past_its_deadline_does_not_wait_for_the_hang(make_service):  # noqa: F811
    """The forward deadline abandons a hung forward; SGLang's own method must not then wait on its lock."""
    tower = SumTower()
    config = CoalescerConfig(budget_bytes=1 << 20, max_batch_items=16, bytes_per_patch=64, forward_timeout_s=0.2)
    service = EncoderService(tower, config, lockstep=False, prefill_wait_s=0.5).start()
    try:
        tower.gate.clear()  # the forward hangs (until the test ends)
        service.on_arrival("hung", [item(1)])
        _eventually(tower.in_forward.is_set, "the forward to hang")
        _eventually(lambda: service.stats()["forward_timeouts"] == 1, "the forward deadline to trip")
        done = threading.Event()
        result: dict = {}

        def prefill() -> None:
            result["value"] = service.encode([item(1)], original=lambda items: "sglang's own")
            done.set()

        threading.Thread(target=prefill, daemon=True).start()
        returned = done.wait(10)  # the wait bound is 0.5 s; the hang lasts until the gate opens
        assert returned and result["value"] == "sglang's own"
    finally:
        tower.gate.set()
        service.close()
