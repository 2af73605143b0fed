"""GraphedTower on CUDA: replayed outputs equal eager ones, own their memory, and wait for slow producers.

Skips cleanly without CUDA. Uses the full-size SigLIP tower (bf16) so the captured graph is the one the
benchmark times; tolerances are those of ``test_towers_cuda.py``.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from mm_scheduler import Coalescer, CoalescerConfig, EncodeItem
from mm_scheduler.towers import build_tower
from mm_scheduler.towers.graphs import GraphedTower

from .cuda_helpers import BF16_TOL, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def siglip():
    tower = build_tower("siglip-mixed", "cuda")
    yield tower
    del tower
    torch.cuda.empty_cache()


def images(tower, n: int, seed: int, resolution: int = 224) -> list[EncodeItem]:
    gen = torch.Generator().manual_seed(seed)
    return [EncodeItem(tower.make_pixels(resolution, pin=True, generator=gen), tower.patches_for(resolution))
            for _ in range(n)]


def run_on(stream: torch.cuda.Stream, tower, units: list[EncodeItem]) -> list[torch.Tensor]:
    with torch.cuda.stream(stream), torch.inference_mode():
        return list(tower.forward(units))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_replayed_batches_match_eager_forwards_for_every_padded_size(siglip, n):
    graphed = GraphedTower(siglip, max_batch=4)
    stream = torch.cuda.Stream()
    units = images(siglip, n, seed=n)
    eager = run_on(stream, siglip, units)
    run_on(stream, graphed, units)  # warm-up (eager), then capture + replay below
    replayed = run_on(stream, graphed, units)
    stream.synchronize()
    assert graphed.stats.captures == 1 and graphed.stats.replays == 1
    for a, b in zip(replayed, eager, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < BF16_TOL


def test_outputs_survive_the_next_replay_of_the_same_graph(siglip):
    """The static output buffer is rewritten by every replay: a returned output must be a copy."""
    graphed = GraphedTower(siglip, max_batch=2)
    stream = torch.cuda.Stream()
    first_units, second_units = images(siglip, 2, seed=10), images(siglip, 2, seed=11)
    run_on(stream, graphed, first_units)  # warm-up
    first = run_on(stream, graphed, first_units)
    stream.synchronize()  # the replay ran on ``stream``: read its outputs only once it is done
    kept = [out.clone() for out in first]
    second = run_on(stream, graphed, second_units)
    stream.synchronize()
    assert graphed.stats.replays == 2
    for out, copy in zip(first, kept, strict=True):
        assert torch.equal(out, copy)
    assert not torch.equal(first[0], second[0])  # different inputs really gave different outputs
    for out in first + second:
        assert out.untyped_storage().nbytes() == out.numel() * out.element_size()  # no view of a shared buffer
        assert all(out.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
                   for g in graphed._graphs.values() if g is not None for s in g.static_outputs)


def test_a_slow_producer_stream_is_waited_for_through_the_coalescer(siglip):
    """Pixels written by a busy producer stream: the replay must read them only after the ready event."""
    graphed = GraphedTower(siglip, max_batch=4)
    cpu_units = images(siglip, 3, seed=20)
    expected = run_on(torch.cuda.Stream(), siglip, cpu_units)
    producer = torch.cuda.Stream()
    busy = torch.randn(4096, 4096, device="cuda")

    async def scenario() -> list[list[torch.Tensor]]:
        config = CoalescerConfig(bytes_per_patch=siglip.bytes_per_patch, dedup=False, max_wait_ms=5.0)
        results = []
        async with Coalescer(graphed, config) as co:
            for _ in range(3):  # warm-up, capture, replay
                with torch.cuda.stream(producer):
                    for _ in range(20):  # keep the producer busy so an unordered read sees garbage
                        busy @ busy
                    gpu_units = [EncodeItem(torch.zeros_like(u.pixel_values, device="cuda"), u.num_patches)
                                 for u in cpu_units]
                    for gpu, cpu in zip(gpu_units, cpu_units, strict=True):
                        gpu.pixel_values.copy_(cpu.pixel_values, non_blocking=True)
                    results.append(await co.encode(gpu_units))  # records ready events on the producer
        return results

    results = asyncio.run(scenario())
    torch.cuda.synchronize()
    assert graphed.stats.replays >= 1
    for outs in results:
        for a, b in zip(outs, expected, strict=True):
            assert rel_err(a, b) < BF16_TOL


def test_larger_batches_and_new_shapes_run_eagerly_and_the_budget_caps_captures(siglip):
    graphed = GraphedTower(siglip, max_batch=2, budget_bytes=1)
    stream = torch.cuda.Stream()
    units = images(siglip, 3, seed=30)
    for _ in range(3):
        run_on(stream, graphed, units)  # 3 > max_batch: always eager
        run_on(stream, graphed, units[:1])  # a budget of 1 byte: never captured
    stream.synchronize()
    assert graphed.stats.captures == 0 and graphed.stats.replays == 0 and graphed.stats.over_budget == 1
