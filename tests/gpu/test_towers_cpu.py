"""Tower adapters on CPU with tiny fp32 configs: they must compute exactly what transformers computes.

transformers is a pinned test dependency (requirements-sglang.txt), so these run in CI and never skip; the
CUDA counterparts, in bf16 at full size, are in test_towers_cuda.py (``make gpu-test``).
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from mm_scheduler import Coalescer, CoalescerConfig, EncodeItem, InvalidItemError
from mm_scheduler.calibrate import calibrate_tower
from mm_scheduler.towers import build_tower


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_pooled(out: object) -> torch.Tensor:
    """transformers 5 returns a ModelOutput with the merged embedding as pooler_output; 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def qwen():
    return build_tower("qwen2_5_vl", "cpu", tiny=True)


@pytest.fixture(scope="module", params=["siglip", "siglip-mixed"])
def siglip(request):
    return build_tower(request.param, "cpu", tiny=True)


def qwen_image(tower, h: int, w: int, gen: torch.Generator) -> EncodeItem:
    return EncodeItem(tower.make_pixels(h, w, generator=gen), h * w, meta={"grid_hw": (h, w)})


def test_qwen_packed_forward_matches_transformers(qwen):
    gen = torch.Generator().manual_seed(0)
    grids = [(8, 8), (4, 6), (16, 12), (2, 2), (10, 18)]  # window-aligned and ragged edges
    units = [qwen_image(qwen, h, w, gen) for h, w in grids]
    with torch.inference_mode():
        got = qwen.forward(units)
        ref = hf_pooled(qwen.model(torch.cat([u.pixel_values for u in units]),
                                   grid_thw=torch.tensor([[1, h, w] for h, w in grids])))
    assert [o.shape[0] for o in got] == [h * w // 4 for h, w in grids]
    assert rel_err(torch.cat(got), ref) < 1e-5


def test_qwen_video_slices_match_one_temporal_grid(qwen):
    video = qwen.make_pixels(8, 10, slices=3, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf_pooled(qwen.model(video.reshape(-1, video.shape[-1]), grid_thw=torch.tensor([[3, 8, 10]])))
        got = qwen.forward([EncodeItem(s, 80, "video", meta={"grid_hw": (8, 10)}) for s in video])
    assert rel_err(torch.cat(got), ref) < 1e-5


def test_siglip_stacked_forward_matches_transformers(siglip):
    gen = torch.Generator().manual_seed(2)
    pixels = [siglip.make_pixels(r, generator=gen) for r in siglip.resolutions for _ in range(2)]
    units = [EncodeItem(p, siglip.patches_for(p.shape[-1])) for p in pixels[::-1]]
    with torch.inference_mode():
        got = siglip.forward(units)
        for unit, out in zip(units, got, strict=True):
            ref = siglip.model(pixel_values=unit.pixel_values[None],
                               interpolate_pos_encoding=siglip.interpolate).last_hidden_state[0]
            assert out.shape == (unit.num_patches, siglip.config.hidden_size)
            assert rel_err(out, ref) < 1e-5


def encode_all(tower, requests: list[list[EncodeItem]]) -> list[list[torch.Tensor]]:
    async def main() -> list[list[torch.Tensor]]:
        config = CoalescerConfig(max_wait_ms=1.0, budget_bytes=1 << 30, bytes_per_patch=tower.bytes_per_patch)
        async with Coalescer(tower, config) as co:
            return list(await asyncio.gather(*(co.encode(r) for r in requests)))

    return asyncio.run(main())


def direct(tower, item: EncodeItem) -> torch.Tensor:
    units = ([EncodeItem(f, item.num_patches, "video", meta=item.meta) for f in item.pixel_values]
             if item.modality == "video" else [item])
    with torch.inference_mode():
        return torch.cat(list(tower.forward(units)))


def test_coalesced_qwen_equals_direct(qwen):
    gen = torch.Generator().manual_seed(3)
    video = EncodeItem(qwen.make_pixels(4, 4, slices=2, generator=gen), 16, "video", meta={"grid_hw": (4, 4)})
    requests = [[qwen_image(qwen, 8, 8, gen)], [qwen_image(qwen, 4, 6, gen), video], [qwen_image(qwen, 12, 8, gen)]]
    for request, outs in zip(requests, encode_all(qwen, requests), strict=True):
        for item, out in zip(request, outs, strict=True):
            assert rel_err(out, direct(qwen, item)) < 1e-5


def test_coalesced_siglip_equals_direct(siglip):
    gen = torch.Generator().manual_seed(4)
    requests = [[EncodeItem(siglip.make_pixels(r, generator=gen), siglip.patches_for(r))
                 for r in siglip.resolutions] for _ in range(3)]
    for request, outs in zip(requests, encode_all(siglip, requests), strict=True):
        for item, out in zip(request, outs, strict=True):
            assert rel_err(out, direct(siglip, item)) < 1e-5


@pytest.mark.parametrize("make", [
    lambda t: EncodeItem(t.make_pixels(4, 4), 16),  # no grid
    lambda t: EncodeItem(t.make_pixels(4, 4), 16, meta={"grid_hw": (4, 6)}),  # grid disagrees with rows
    lambda t: EncodeItem(t.make_pixels(3, 4), 12, meta={"grid_hw": (3, 4)}),  # odd grid cannot merge 2x2
    lambda t: EncodeItem(t.make_pixels(4, 4), 15, meta={"grid_hw": (4, 4)}),  # wrong patch count
    lambda t: EncodeItem(t.make_pixels(4, 4), 16, "video", meta={"grid_hw": (4, 4)}),  # video lacks slice axis
])
def test_qwen_rejects_malformed_items(qwen, make):
    with pytest.raises(ValueError):
        qwen.validate(make(qwen))
    with pytest.raises(InvalidItemError):
        encode_all(qwen, [[make(qwen)]])


def test_siglip_rejects_malformed_items():
    tower = build_tower("siglip", "cpu", tiny=True)
    size = tower.config.image_size
    for item in (EncodeItem(torch.zeros(3, size * 2, size * 2), tower.patches_for(size * 2)),  # not native size
                 EncodeItem(torch.zeros(size, size), 16),  # no channel axis
                 EncodeItem(tower.make_pixels(), tower.patches_for(size) + 1)):  # wrong patch count
        with pytest.raises(ValueError):
            tower.validate(item)


@pytest.mark.parametrize("name", ["siglip", "siglip-mixed", "qwen2_5_vl"])
def test_example_requests_are_valid_and_encode_to_the_direct_result(name):
    tower = build_tower(name, "cpu", tiny=True)
    rng = random.Random(0)
    requests = [tower.example_request(rng) for _ in range(20)]
    for request in requests:
        for item in request:
            tower.validate(item)
    encoded = encode_all(tower, requests[:4])
    assert len(encoded) == 4
    for request, outs in zip(requests[:4], encoded, strict=True):
        assert len(outs) == len(request)
        for item, out in zip(request, outs, strict=True):
            assert rel_err(out, direct(tower, item)) < 1e-5  # coalesced equals the tower run on this item alone


def test_build_tower_names_the_choices():
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        build_tower("clip", "cpu")


def test_calibration_refuses_cpu(qwen):
    with pytest.raises(ValueError, match="CUDA"):
        calibrate_tower(qwen)


def test_handed_off_outputs_are_what_the_executor_would_keep_and_host_views_are_not_copied():
    """The consumer reads and frees what ``own_storage`` keeps (a CUDA view of a larger buffer is copied out, so it is
    the copy that is tied to the consumer); on the host nothing is copied, as the executor copies nothing there."""
    from mm_scheduler.executor import own_storage
    from mm_scheduler.towers._staging import handed_off

    batch = torch.arange(12.0).reshape(3, 4)
    parts = list(batch)
    outputs = handed_off(parts, None)
    assert all(out is own_storage(part) for out, part in zip(outputs, parts, strict=True))
    assert all(out is part for out, part in zip(outputs, parts, strict=True))
