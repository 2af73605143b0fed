"""Backend choice under tensor parallelism: lockstep wherever the tower's forward has collectives."""

from __future__ import annotations

import pytest
from mm_scheduler_sglang.modes import choose_mode


@pytest.mark.parametrize("requested", ["auto", "async", "lockstep"])
def test_single_rank_runs_what_was_asked_and_auto_is_async(requested):
    assert choose_mode(requested, 1, False) == ("lockstep" if requested == "lockstep" else "async")
    assert choose_mode(requested, 1, True) == ("lockstep" if requested == "lockstep" else "async")


@pytest.mark.parametrize("requested", ["auto", "async", "lockstep"])
@pytest.mark.parametrize("tp_size", [2, 4, 8])
def test_a_tp_sharded_tower_always_runs_lockstep(requested, tp_size):
    assert choose_mode(requested, tp_size, dp_encoder=False) == "lockstep"


@pytest.mark.parametrize("tp_size", [2, 8])
def test_a_replicated_data_parallel_tower_runs_async_unless_lockstep_is_asked(tp_size):
    assert choose_mode("auto", tp_size, dp_encoder=True) == "async"
    assert choose_mode("async", tp_size, dp_encoder=True) == "async"
    assert choose_mode("lockstep", tp_size, dp_encoder=True) == "lockstep"


@pytest.mark.parametrize(("requested", "tp_size"), [("fast", 1), ("", 2), ("auto", 0)])
def test_unknown_modes_and_sizes_are_rejected(requested, tp_size):
    with pytest.raises(ValueError):
        choose_mode(requested, tp_size, False)
