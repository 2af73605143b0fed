"""``--mm-enable-dp-encoder``: a replicated Qwen2.5-VL tower is driven without collectives, so async is safe."""

from __future__ import annotations

import sglang_models as sm
import torch
from mm_scheduler_sglang.adapters import tower_for
from mm_scheduler_sglang.modes import choose_mode


def test_replicated_qwen2_5_tower_is_called_directly_and_matches_sglangs_own_method():
    model = sm.qwen2_5_vl()
    items = [sm.qwen_image(model, 4, 4, 1), sm.qwen_image(model, 4, 6, 2)]
    expected = model.get_image_feature(items)  # TP=1: SGLang's own method, no DP sharding
    model.use_data_parallel = True  # what SGLang sets under --mm-enable-dp-encoder
    try:
        tower = tower_for(model)
        assert tower.collective_free
        assert choose_mode("auto", tp_size=2, dp_encoder=tower.collective_free) == "async"
        outputs = tower.forward([unit for item in items for unit in tower.units(item)])
    finally:
        model.use_data_parallel = False
    torch.testing.assert_close(torch.cat(outputs), expected)


def test_sharded_tower_is_not_collective_free_and_gets_lockstep_at_tp2():
    tower = tower_for(sm.qwen2_5_vl())
    assert not tower.collective_free
    assert choose_mode("async", tp_size=2, dp_encoder=tower.collective_free) == "lockstep"


def test_a_model_without_the_dp_encoder_switch_is_not_collective_free():
    """A build that never set ``use_data_parallel`` shards nothing: its own method is what runs."""
    model = sm.qwen2_5_vl()
    del model.use_data_parallel
    assert not tower_for(model).collective_free
