"""The soak, short: 2,000 requests from 200 clients with every fault at once (``make soak`` runs 10,000 x 400).

Runs on asyncio and uvloop (conftest). What it proves is listed in :mod:`mm_scheduler.soak`; each
check is computed from counters (ledger, coalescer stats, tower log), and the run must also have
exercised every fault it claims to (cancels while running, poison, OOM, the hang and its recovery).
"""

from __future__ import annotations

import pytest

from mm_scheduler.soak import SoakSettings, format_table, run_soak

from .helpers import pending_tasks


@pytest.mark.stress
async def test_soak_loses_nothing_returns_nothing_wrong_and_recovers_from_a_hang():
    settings = SoakSettings(requests=2000, clients=200, seed=11)
    report = await run_soak(settings)
    figures = report["figures"]
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert failed == [], f"{failed}\n{format_table(report)}"
    assert figures["ok"] > settings.requests // 2
    assert figures["cancelled"] > 0 and figures["cancelled_while_running"] > 0
    assert figures["failed_poisoned"] > 0 and figures["oom_backoffs"] > 0 and figures["dedup_hits"] > 0
    assert figures["hung_forwards"] == 1 and figures["forward_timeouts"] == 1 and figures["health_probes"] >= 1
    assert figures["timed_out"] + figures["fallback_unhealthy"] > 0
    assert pending_tasks() == set()
