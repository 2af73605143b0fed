"""Backend choice under tensor parallelism: lockstep wherever the tower's forward has collectives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mm_scheduler_sglang.modes import choose_mode, encoder_is_data_parallel, tp_agreement


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


@pytest.mark.parametrize(("requested", "tp_size", "message"), [
    ("fast", 1, r"mode 'fast': expected one of \['auto', 'async', 'lockstep'\]"),
    ("", 2, "mode '': expected one of"),
    ("auto", 0, "tp_size must be >= 1, got 0"),
])
def test_unknown_modes_and_sizes_are_rejected_naming_the_value(requested, tp_size, message):
    with pytest.raises(ValueError, match=message):
        choose_mode(requested, tp_size, False)


def test_a_data_parallel_encoder_is_read_from_the_models_flag():
    assert encoder_is_data_parallel(SimpleNamespace(use_data_parallel=True)) is True
    assert encoder_is_data_parallel(SimpleNamespace(use_data_parallel=False)) is False
    assert encoder_is_data_parallel(SimpleNamespace()) is False


def test_lockstep_failures_are_agreed_over_the_schedulers_attention_tp_cpu_group(monkeypatch):
    import mm_scheduler.lockstep

    groups = []
    monkeypatch.setattr(mm_scheduler.lockstep, "process_group_agree", lambda group: groups.append(group) or "agree")
    cpu_group = object()
    assert tp_agreement(SimpleNamespace(attn_tp_cpu_group=cpu_group, tp_cpu_group=object())) == "agree"
    assert groups == [cpu_group]
