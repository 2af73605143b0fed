"""GraphedTower without CUDA: it refuses ragged towers, pads to captured sizes and passes CPU work through."""

from __future__ import annotations

import pytest
import torch

from mm_scheduler import EncodeItem
from mm_scheduler.testing import FakeTower
from mm_scheduler.towers.graphs import GraphedTower, graphed


def test_a_ragged_tower_is_refused_because_its_forward_has_no_static_shape():
    with pytest.raises(ValueError, match="ragged"):
        GraphedTower(FakeTower(ragged=True))
    ragged = FakeTower(ragged=True)
    assert graphed(ragged) is ragged


def test_batches_pad_to_the_next_captured_size_and_larger_ones_stay_eager():
    tower = GraphedTower(FakeTower(ragged=False), max_batch=4)
    assert tower.sizes == (1, 2, 4)
    assert [tower.padded_size(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]
    assert GraphedTower(FakeTower(ragged=False), max_batch=6).sizes == (1, 2, 4, 6)


def test_on_cpu_every_forward_is_the_inner_towers_own():
    inner = FakeTower(ragged=False)
    tower = GraphedTower(inner, max_batch=4)
    units = [EncodeItem(torch.full((2, 3), float(i)), 16) for i in range(3)]
    assert not tower.enabled
    outs = tower.forward(units)
    assert [o.tolist() for o in outs] == [o.tolist() for o in inner.forward(units)]
    assert tower.stats.eager_forwards == 1 and tower.stats.captures == 0
    assert tower.bytes_per_patch == inner.bytes_per_patch and tower.ragged is False
    assert graphed(inner) is inner  # not CUDA: nothing to wrap
