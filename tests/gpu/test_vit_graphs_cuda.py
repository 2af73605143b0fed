"""The plugin's own ViT CUDA graphs (integration/vit_graphs.py) on real tiny SGLang Qwen towers, with SGLang's
triton varlen vision attention (the backend graphs are captured for; the real-server harness uses it).

What would fail if the graphs were wrong:
* two batches of different image sizes in one bucket: a replay that kept the first batch's segment
  boundaries (what SGLang 0.5.16's own runner does for equal lengths) attends across images;
* a result read after the next replay: a view of the graph's memory instead of a copy;
* a batch on a second stream while the first stream's replay waits behind a long kernel: it must be
  declined (run eagerly), not overwrite the first one's inputs, and not queue behind a stream given up on;
* a graph whose ``max_seqlen`` is below its bucket (the short class): SGLang's triton kernel then covers only
  that many rows of each segment, so an image segment longer than it would lose rows (the CPU attention
  ignores ``max_seqlen``: only a GPU sees this);
* the adapter: batches are cut into runs by the buckets, batches no bucket holds run
  the tower itself, and every output equals the tower's own forward;
* the idle path (``encode_now``, on the scheduler's thread): a replay that did not run on the caller's
  stream would read pixels the caller's stream has not written yet.

Run: ``python -m pytest -q tests/gpu/test_vit_graphs_cuda.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))  # sglang_models: tiny real SGLang models

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("sglang")

from mm_scheduler_sglang.vit_graphs import QwenVisionGraphs, patch_width

from mm_scheduler import EncodeItem

pytestmark = pytest.mark.gpu
BUCKETS = [256, 1024]


def _tower(name: str) -> torch.nn.Module:
    """A tiny real SGLang Qwen model in bf16 on CUDA with SGLang's triton varlen vision attention."""
    import sgl_kernel
    import sglang_models
    from sglang.srt.layers.attention.vision import VisionTritonAttention

    model = sglang_models.BUILDERS[name]()
    for block in model.visual.blocks:
        block.attn.qkv_backend = VisionTritonAttention(use_data_parallel=False)
    if "stand-in" in getattr(sgl_kernel, "__version__", ""):  # tests/gpu/shims (no kernels): SGLang's own torch RMSNorm
        from sglang.srt.layers.layernorm import RMSNorm

        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.forward = module.forward_native
    return model.to("cuda", torch.bfloat16)


def _pixels(model: torch.nn.Module, grids: list[tuple[int, int, int]], seed: int) -> torch.Tensor:
    dim = patch_width(model.visual)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), dim, device="cuda", generator=generator)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 and padded GEMM shapes differ from eager in the last bits; a wrong segment or a stale input is O(1)."""
    assert actual.shape == expected.shape
    scale = expected.float().abs().max().item()
    assert (actual.float() - expected.float()).abs().max().item() <= 0.02 * scale


@pytest.fixture(params=["qwen2_5_vl", "qwen3_vl"])
def captured(request):
    model = _tower(request.param)
    graphs = QwenVisionGraphs(model.visual, BUCKETS)
    assert QwenVisionGraphs.why_not(model.visual) is None
    assert graphs.capture() > 0
    return model, graphs


# Both 64 rows (the 256 bucket), different segments: one image, then two of other shapes.
SAME_BUCKET = [[(1, 8, 8)], [(1, 4, 4), (1, 4, 12)], [(1, 4, 8), (1, 4, 4), (1, 4, 4)]]


@torch.inference_mode()
def test_batches_of_other_image_sizes_in_one_bucket_each_match_the_towers_own_forward(captured):
    model, graphs = captured
    outcomes: list[bool] = []
    graphs.on_forward = outcomes.append  # what the plugin counts in mm_coalescer_vit_graph_forwards_total
    for seed, grids in enumerate(SAME_BUCKET):
        pixels, grid = _pixels(model, grids, seed), torch.tensor(grids)
        out = graphs.run(pixels, grid)
        assert out is not None
        _close(out, model.visual(pixels, grid_thw=grid.cuda()))
    assert graphs.replays == len(SAME_BUCKET) and outcomes == [True] * len(SAME_BUCKET)
    graphs.run(_pixels(model, [(1, 32, 36)], 9), torch.tensor([(1, 32, 36)]))  # 1,152 rows: no bucket
    assert outcomes[-1] is False


@torch.inference_mode()
def test_a_result_is_not_overwritten_by_the_next_replay(captured):
    model, graphs = captured
    first = [(_pixels(model, SAME_BUCKET[0], 10), torch.tensor(SAME_BUCKET[0]))]
    second = (_pixels(model, SAME_BUCKET[1], 11), torch.tensor(SAME_BUCKET[1]))
    kept = graphs.run(*first[0])
    expected = kept.clone()
    graphs.run(*second)
    torch.cuda.synchronize()
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
@torch.inference_mode()
def test_a_bucket_replays_ordinary_images_in_its_short_class_and_a_large_one_in_its_long_class(name):
    from mm_scheduler_sglang.vit_graphs import SHORT_SEGMENT

    model = _tower(name)
    graphs = QwenVisionGraphs(model.visual, [4096])
    graphs.capture()
    cases = [([(1, 30, 30)] * 3, SHORT_SEGMENT),  # 2,700 rows of 900-row images: padding cut at 1,280
             ([(1, 32, 40)], SHORT_SEGMENT),  # 1,280 rows: exactly the short bound
             ([(1, 40, 40)], 4096),  # 1,600 rows: longer than the short bound
             ([(1, 20, 20), (1, 36, 36)], 4096)]  # 1,296 next to 400
    for seed, (grids, longest) in enumerate(cases):
        pixels, grid = _pixels(model, grids, 40 + seed), torch.tensor(grids)
        prepared = graphs.prepare(pixels, grid)
        static, _ = graphs.fit(graphs._static, prepared)
        assert static.bucket.full_max == longest
        out = graphs.run(pixels, grid)
        assert out is not None
        _close(out, model.visual(pixels, grid_thw=grid.cuda()))
    assert graphs.replays == len(cases)


class _SlowReplay:
    """A captured graph whose replay first keeps its stream busy for ~0.1 s (an H200's ``_sleep`` cycles)."""

    def __init__(self, graph: torch.cuda.CUDAGraph) -> None:
        self.graph = graph

    def replay(self) -> None:
        torch.cuda._sleep(200_000_000)
        self.graph.replay()


@torch.inference_mode()
def test_a_batch_on_another_stream_runs_eagerly_while_the_last_replay_is_still_queued(captured):
    """Replays share one memory pool and one set of static inputs. Batch a's replay sits behind a 0.1 s kernel
    on one stream when batch b comes on another (the executor's renewed stream after a hung forward): b must
    neither overwrite a's inputs nor wait behind it, so it is declined (the caller runs the tower); once a's
    replay is done, the other stream replays again."""
    model, graphs = captured
    slow = [_SlowReplay(static.graph) for static in graphs._static]
    for static, replay in zip(graphs._static, slow, strict=True):
        static.graph = replay
    a = (_pixels(model, SAME_BUCKET[0], 20), torch.tensor(SAME_BUCKET[0]))
    b = (_pixels(model, SAME_BUCKET[1], 21), torch.tensor(SAME_BUCKET[1]))
    expected_a, expected_b = model.visual(a[0], grid_thw=a[1].cuda()), model.visual(b[0], grid_thw=b[1].cuda())
    first, second = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(first):
        out_a = graphs.run(*a)
    with torch.cuda.stream(second):
        assert graphs.run(*b) is None
    torch.cuda.synchronize()
    _close(out_a, expected_a)
    with torch.cuda.stream(second):
        out_b = graphs.run(*b)
    torch.cuda.synchronize()
    _close(out_b, expected_b)


@torch.inference_mode()
def test_the_adapter_splits_large_batches_into_runs_and_leaves_unheld_ones_to_the_tower(captured):
    from mm_scheduler_sglang.adapters import QwenVLTower

    model, graphs = captured
    tower = QwenVLTower(model)
    tower.graphs = graphs
    # 512 + 384 fill the 1024 bucket; 256 and 64 replay the 256 bucket once each (cut_into_runs: 2 x 256 rows
    # and two replays cost less than 1024 rows and one); 1152 no bucket holds: the tower's own forward.
    grids = [(1, 16, 32), (1, 16, 24), (1, 16, 16), (1, 8, 8), (1, 32, 36)]
    units = [EncodeItem(_pixels(model, [g], 30 + i), g[0] * g[1] * g[2], "image", None, {"grid": g})
             for i, g in enumerate(grids)]
    before = graphs.replays
    outputs = tower.forward(units)
    assert graphs.replays - before == 3
    for unit, out in zip(units, outputs, strict=True):
        _close(out, model.visual(unit.pixel_values, grid_thw=torch.tensor([unit.meta["grid"]], device="cuda")))


@torch.no_grad()
def test_an_idle_prefills_replay_runs_on_the_callers_stream_after_the_work_queued_there(captured):
    """``encode_now`` (the plugin's inline path) runs where the scheduler calls it, under its ``no_grad`` (not
    inference mode: the real server's first inline replay raised on the inference-mode static buffers). The
    pixels of its items are written on the scheduler's stream behind a 0.1 s kernel, over NaNs: a replay on any
    other stream, or one not ordered after that copy, reads NaNs. Images no bucket holds go to the model's own
    method; an image on the CPU beside one on the GPU is replayed with it."""
    from mm_scheduler_sglang.adapters import QwenVLTower
    from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem

    model, graphs = captured
    tower = QwenVLTower(model)
    tower.graphs = graphs
    own_calls = []

    def own_method(items):
        own_calls.append(len(items))
        grids = torch.cat([item.model_specific_data["image_grid_thw"] for item in items])
        return model.visual(torch.cat([item.feature for item in items]), grid_thw=grids.cuda())

    # 64 rows; 1,152 rows (no bucket); 64 rows whose first image is on the CPU (a full CUDA-IPC pool's fallback)
    for grids, replayed, on_cpu in ((SAME_BUCKET[2], True, 0), ([(1, 32, 36)], False, 0), (SAME_BUCKET[1], True, 1)):
        sources = [_pixels(model, [grid], 60 + i) for i, grid in enumerate(grids)]
        expected = model.visual(torch.cat(sources), grid_thw=torch.tensor(grids).cuda())
        features = [torch.full_like(source, float("nan")) for source in sources]
        features[:on_cpu] = [source.cpu() for source in sources[:on_cpu]]
        items = [MultimodalDataItem(modality=Modality.IMAGE, feature=feature,
                                    model_specific_data={"image_grid_thw": torch.tensor([grid])})
                 for feature, grid in zip(features, grids, strict=True)]
        scheduler = torch.cuda.Stream()
        torch.cuda.synchronize()
        replays, calls = graphs.replays, len(own_calls)
        with torch.cuda.stream(scheduler):
            torch.cuda._sleep(200_000_000)
            for feature, source in zip(features[on_cpu:], sources[on_cpu:], strict=True):
                feature.copy_(source)
            out = tower.encode_now(items, own_method)
            consumed = out * 1  # what the prefill does next, on the same stream
        torch.cuda.synchronize()
        _close(consumed, expected)
        assert (graphs.replays - replays, len(own_calls) - calls) == ((1, 0) if replayed else (0, 1))
