"""Full-size towers in bf16 on CUDA: coalesced output equals direct output, the packed varlen Qwen
path equals transformers' own forward, staging works from any input, and calibration is sane.

Skips cleanly without CUDA or without transformers.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from mm_scheduler import Coalescer, CoalescerConfig, EncodeItem
from mm_scheduler.calibrate import calibrate, measure_forward_peak
from mm_scheduler.towers import build_tower

from .cuda_helpers import BF16_TOL, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["siglip", "siglip-mixed", "qwen2_5_vl"])
def tower(request):
    built = build_tower(request.param, "cuda")
    yield built
    del built
    torch.cuda.empty_cache()


def items_for(tower, gen: torch.Generator) -> list[list[EncodeItem]]:
    """Three requests: single image, multi-image, and (Qwen) a video, of mixed sizes."""
    if tower.ragged:
        def img(h: int, w: int) -> EncodeItem:
            return EncodeItem(tower.make_pixels(h, w, pin=True, generator=gen), h * w, meta={"grid_hw": (h, w)})

        video = EncodeItem(tower.make_pixels(16, 16, 4, pin=True, generator=gen), 256, "video",
                           meta={"grid_hw": (16, 16)})
        return [[img(32, 32)], [img(16, 24), img(20, 36)], [video, img(24, 24)]]

    def img(r: int) -> EncodeItem:
        return EncodeItem(tower.make_pixels(r, pin=True, generator=gen), tower.patches_for(r))

    sizes = tower.resolutions
    return [[img(sizes[0])], [img(sizes[-1]), img(sizes[0])], [img(s) for s in sizes]]


def direct(tower, item: EncodeItem) -> torch.Tensor:
    units = ([EncodeItem(f, item.num_patches, "video", meta=item.meta) for f in item.pixel_values]
             if item.modality == "video" else [item])
    with torch.inference_mode():
        out = torch.cat(list(tower.forward(units)))
    torch.cuda.synchronize()
    return out


def test_coalesced_equals_direct(tower):
    requests = items_for(tower, torch.Generator().manual_seed(0))

    async def main() -> list[list[torch.Tensor]]:
        config = CoalescerConfig(max_wait_ms=5.0, budget_bytes=4 << 30, bytes_per_patch=tower.bytes_per_patch)
        async with Coalescer(tower, config) as co:
            return list(await asyncio.gather(*(co.encode(r) for r in requests)))

    for request, outs in zip(requests, asyncio.run(main()), strict=True):
        for item, out in zip(request, outs, strict=True):
            ref = direct(tower, item)
            assert out.shape == ref.shape
            assert torch.isfinite(out).all()
            assert rel_err(out, ref) < BF16_TOL


def test_staging_from_pageable_and_cuda_inputs(tower):
    request = items_for(tower, torch.Generator().manual_seed(1))[1]
    pinned = [direct(tower, it) for it in request]
    for move in (lambda t: t.clone(), lambda t: t.cuda()):  # pageable host memory, then device memory
        moved = [EncodeItem(move(it.pixel_values), it.num_patches, it.modality, meta=it.meta) for it in request]
        for a, b in zip(pinned, [direct(tower, it) for it in moved], strict=True):
            assert torch.equal(a, b)


def test_qwen_varlen_matches_transformers_and_sdpa_path():
    tower = build_tower("qwen2_5_vl", "cuda")
    if tower.attention != "varlen":
        pytest.skip("torch has no varlen flash attention here")
    gen = torch.Generator().manual_seed(2)
    grids = [(32, 32), (16, 24), (20, 36), (2, 2)]
    units = [EncodeItem(tower.make_pixels(h, w, generator=gen), h * w, meta={"grid_hw": (h, w)}) for h, w in grids]
    with torch.inference_mode():
        got = torch.cat(tower.forward(units))
        ref = tower.model(torch.cat([u.pixel_values for u in units]).cuda(),
                          grid_thw=torch.tensor([[1, h, w] for h, w in grids], device="cuda"))
        ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
        tower.attention = "sdpa"
        grouped = torch.cat(tower.forward(units))
    assert rel_err(got, ref) < BF16_TOL
    assert rel_err(grouped, ref) < BF16_TOL


def test_calibrated_budget_holds_at_batch_scale(tower):
    cal = calibrate(tower, tower.probe_units, tower.probe_patch_counts, margin=0.2)
    assert 0 < cal.slope <= cal.bytes_per_patch
    budget = 48 * tower.probe_patch_counts[0] // 4 * cal.bytes_per_patch  # about 48 probe images
    units = tower.probe_units(budget // cal.bytes_per_patch)
    with torch.inference_mode():
        peak = measure_forward_peak(tower, units, tower.device)
    assert peak <= budget
