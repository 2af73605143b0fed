"""The plugin's ViT CUDA graphs (integration/vit_graphs.py), all of it that runs without CUDA: the padding of
segments, the choice of bucket, the eager prologue and captured body run on the padded static buffers
against SGLang's own ``visual.forward`` (real tiny Qwen towers, both SGLang versions in CI), the adapter's
runs under the largest bucket, and what the plugin logs when it cannot capture.

Capture and replay themselves, the stream ordering and the copy-out are in tests/gpu/test_vit_graphs_cuda.py.
"""

from __future__ import annotations

import logging

import pytest
import sglang_models as sm
import torch
from mm_scheduler_sglang import settings, sglang_plugin
from mm_scheduler_sglang.adapters import QwenVLTower, tower_for
from mm_scheduler_sglang.vit_graphs import (
    LONGEST_SEGMENT,
    SHORT_SEGMENT,
    QwenVisionGraphs,
    cut_into_runs,
    make_buckets,
    padded_lengths,
    patch_width,
)

from mm_scheduler import EncodeItem


@pytest.mark.parametrize("lengths, total, capacity, longest, expected", [
    ([64], 64, 2, 64, [64, 0]),  # exact fit: no padding segment, the rest empty
    ([16, 48], 256, 4, 256, [16, 48, 192, 0]),  # padding is one segment of its own
    ([16], 100, 8, 32, [16, 32, 32, 20, 0, 0, 0, 0]),  # padding cut at the longest segment
    ([16, 16, 16], 64, 3, 64, None),  # the padding needs a fourth slot
    ([100], 256, 4, 64, None),  # a segment longer than the kernel's bound
    ([300], 256, 4, 512, None),  # more rows than the bucket
])
def test_padding_fills_the_bucket_with_segments_of_its_own_and_empty_slots(lengths, total, capacity, longest,
                                                                          expected):
    out = padded_lengths(lengths, total, capacity, longest)
    assert out == expected
    if out is not None:
        assert sum(out) == total and len(out) == capacity


def test_padding_longer_than_its_own_bound_is_cut_shorter_than_the_real_segments_bound():
    assert padded_lengths([1000], 4096, 6, 4096, pad_longest=1280) == [1000, 1280, 1280, 536, 0, 0]


def test_each_bucket_has_a_short_class_and_a_long_one_where_it_can_hold_longer_segments():
    buckets = make_buckets([65536, 1024], None)
    assert [(b.patches, b.full_max) for b in buckets] == [(1024, 1024), (65536, SHORT_SEGMENT),
                                                          (65536, LONGEST_SEGMENT)]
    assert buckets[0].full_segments == 4 and buckets[0].window_segments == 0
    assert [b.full_pad_max for b in buckets] == [1024, SHORT_SEGMENT, SHORT_SEGMENT]
    windowed = make_buckets([65536], 64)[0]
    assert windowed.window_max == 64 and windowed.window_segments == 65536 // 32 + 65536 // 64


def test_a_bucket_holds_any_count_over_512_plus_one_images_its_rows_hold_however_small_they_are():
    for count in (256, 1024, 4096, 28672):
        images = count // 512 + 1
        for bucket in make_buckets([count], None):
            for rows in (4, min(bucket.full_max, count // images)):
                assert padded_lengths([rows] * images, count, bucket.full_segments, bucket.full_max,
                                      bucket.full_pad_max) is not None, (bucket, rows)


@torch.inference_mode()
def test_a_batch_of_ordinary_images_takes_the_short_class_and_a_large_image_the_long_one():
    model = sm.BUILDERS["qwen3_vl"]()
    graphs = QwenVisionGraphs(model.visual, [4096])
    statics = graphs.allocate(torch.device("cpu"))
    for grids, longest in (([(1, 30, 30)] * 3, SHORT_SEGMENT), ([(1, 40, 40)], 4096)):
        prepared = graphs.prepare(_pixels(model, grids, 0), torch.tensor(grids))
        static, (full, _) = graphs.fit(statics, prepared)
        assert static.bucket.full_max == longest
        assert max(full) <= longest and sum(full) == 4096


@torch.inference_mode()
def test_tunes_poisson_buckets_hold_qwen3_poisson_forwards_and_replay_what_sglangs_own_forward_gives():
    """The buckets `mm-scheduler tune` proposed from Qwen3-VL's Poisson scrape (1a3705d: 1-3 images of ~1,600
    patches a forward) on the tower they were proposed for: one image takes the 2,048 bucket's long class, two the
    4,096 bucket, three are cut into 4,096 + 2,048, and the padded static forward equals SGLang's own."""
    model = sm.BUILDERS["qwen3_vl"]()
    graphs = QwenVisionGraphs(model.visual, [2048, 4096, 8192])
    statics = graphs.allocate(torch.device("cpu"))
    for grids, patches in (([(1, 40, 40)], 2048), ([(1, 40, 40)] * 2, 4096)):
        pixels, grid = _pixels(model, grids, len(grids)), torch.tensor(grids)
        prepared = graphs.prepare(pixels, grid)
        static, layout = graphs.fit(statics, prepared)
        assert static.bucket.patches == patches and static.bucket.full_max == patches  # the long class
        static.load(prepared, *layout)
        out = graphs.unpad(graphs._blocks(static), prepared)
        torch.testing.assert_close(out, model.visual(pixels, grid_thw=grid), rtol=1e-5, atol=1e-5)
    assert cut_into_runs([1600] * 3, graphs.buckets) == [(0, 2), (2, 3)]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def qwen(request):
    return sm.BUILDERS[request.param]()


def _pixels(model, grids, seed):
    dim = patch_width(model.visual)
    return torch.randn(sum(t * h * w for t, h, w in grids), dim, generator=torch.Generator().manual_seed(seed))


LAYOUTS = [  # (grids, the bucket that holds them among 256 and 1024 patches)
    ([(1, 4, 4)], 256),  # one small image
    ([(1, 16, 16)], 256),  # an exact fit: no padding segment
    ([(1, 4, 6), (1, 8, 4)], 1024),  # 56 rows, but two images and the padding need three segments
    ([(2, 4, 4), (1, 12, 8)], 1024),  # a two-frame clip beside an image
    ([(1, 16, 16), (1, 8, 8)], 1024),  # 320 rows
    ([(1, 8, 8)] * 3, 1024),  # three images and the padding: the large bucket's four segments
]


@pytest.mark.parametrize("grids, bucket", LAYOUTS, ids=str)
@torch.inference_mode()
def test_the_padded_static_forward_equals_sglangs_own_forward(qwen, grids, bucket):
    graphs = QwenVisionGraphs(qwen.visual, [256, 1024])
    statics = graphs.allocate(torch.device("cpu"))
    pixels, grid = _pixels(qwen, grids, len(grids)), torch.tensor(grids)
    prepared = graphs.prepare(pixels, grid)
    chosen = graphs.fit(statics, prepared)
    assert chosen is not None
    static, layout = chosen
    assert static.bucket.patches == bucket
    static.load(prepared, *layout)
    out = graphs.unpad(graphs._blocks(static), prepared)
    torch.testing.assert_close(out, qwen.visual(pixels, grid_thw=grid), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_six_images_and_more_take_sglangs_vectorized_position_embedding_and_still_equal_its_own_forward(qwen):
    """Qwen3-VL on SGLang 0.5.23 interpolates position embeddings with a vectorized path from 6 images a call
    (``_use_vectorized_pos_embed``; a seed request has 6): the static forward must take that path as SGLang does."""
    grids = [(1, 4, 4), (1, 4, 8), (1, 8, 4), (1, 4, 4), (1, 8, 8), (1, 4, 4), (1, 4, 4)]
    graphs = QwenVisionGraphs(qwen.visual, [4096])
    pixels, grid = _pixels(qwen, grids, 7), torch.tensor(grids)
    prepared = graphs.prepare(pixels, grid)
    static, layout = graphs.fit(graphs.allocate(torch.device("cpu")), prepared)
    static.load(prepared, *layout)
    out = graphs.unpad(graphs._blocks(static), prepared)
    torch.testing.assert_close(out, qwen.visual(pixels, grid_thw=grid), rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_batch_no_bucket_holds_is_not_fitted(qwen):
    graphs = QwenVisionGraphs(qwen.visual, [256])
    statics = graphs.allocate(torch.device("cpu"))
    for grids in ([(1, 16, 20)], [(1, 4, 4)] * 3):  # too many rows; too many segments
        assert graphs.fit(statics, graphs.prepare(_pixels(qwen, grids, 0), torch.tensor(grids))) is None


class _Recorder:
    """Stands in for captured graphs: records each run's rows and declines, so the tower runs eagerly."""

    def __init__(self, patches: list[int]) -> None:
        self.buckets = make_buckets(patches, None)
        self.runs: list[int] = []

    def run(self, pixels, grids):
        self.runs.append(int(pixels.shape[0]))
        return None


def _sizes(rows, runs):
    return [sum(rows[a:b]) for a, b in runs]


def test_runs_are_cut_to_the_buckets_so_a_batch_replays_fewer_padded_rows():
    buckets = make_buckets([4096, 8192, 16384], None)
    rows = [900] * 13  # in one run: 11,700 rows padded to 16,384
    runs = cut_into_runs(rows, buckets)
    assert sorted(_sizes(rows, runs)) == [3600, 8100]  # 4,096 + 8,192 buckets
    assert [b for _, b in runs][-1] == 13 and all(a < b for a, b in runs)


def test_runs_keep_one_replay_where_splitting_saves_less_than_a_replay_costs():
    buckets = make_buckets([4096, 8192], None)
    assert cut_into_runs([900] * 8, buckets, replay_rows=256) == [(0, 8)]  # 7,200 in 8,192
    assert cut_into_runs([2000, 2000, 100], buckets, replay_rows=256) == [(0, 3)]  # 4,100: 8,192 beats 4,096 + 4,096


def test_a_unit_no_bucket_holds_is_a_run_of_its_own_and_order_is_kept():
    buckets = make_buckets([1024], None)
    rows = [512, 384, 256, 64, 1152, 100]
    runs = cut_into_runs(rows, buckets)
    assert (4, 5) in runs and [a for a, _ in runs] == sorted(a for a, _ in runs)
    assert runs[0][0] == 0 and runs[-1][1] == len(rows)
    assert all(sum(rows[a:b]) <= 1024 for a, b in runs if (a, b) != (4, 5))


def test_a_unit_longer_than_every_bucket_allows_a_segment_runs_alone_and_leaves_the_rest_their_replay():
    buckets = make_buckets([4096, 8192, 16384, 28672], None)  # the harness's buckets: segments of 8,192 at most
    assert cut_into_runs([9000, 900, 900, 900], buckets) == [(0, 1), (1, 4)]
    assert cut_into_runs([900, 5000, 900], make_buckets([8192], None)) == [(0, 3)]  # 5,000 fits the long class


def test_runs_never_hold_more_units_than_a_bucket_has_segments_for():
    buckets = make_buckets([1024], None)  # 1024 // 512 + 1 = 3 images
    runs = cut_into_runs([16] * 7, buckets)
    assert all(b - a <= 3 for a, b in runs) and sum(b - a for a, b in runs) == 7
    assert cut_into_runs([], buckets) == []


def test_a_run_that_exactly_fills_a_buckets_rows_or_units_is_one_replay_and_without_buckets_each_unit_runs_alone():
    assert cut_into_runs([2048, 2048], make_buckets([4096], None)) == [(0, 2)]  # 4,096 rows in 4,096
    assert cut_into_runs([16] * 3, make_buckets([1024], None)) == [(0, 3)]  # room for 3 units
    assert cut_into_runs([5, 6], []) == [(0, 1), (1, 2)]


def test_a_qwen_tower_on_the_capturable_backend_is_refused_only_for_not_being_on_cuda():
    from sglang.srt.layers.attention.vision import VisionTritonAttention

    model = sm.BUILDERS["qwen2_5_vl"]()
    assert QwenVisionGraphs.why_not(model.visual).startswith("its vision attention backend is VisionSdpaAttention")
    for block in model.visual.blocks:
        block.attn.qkv_backend = VisionTritonAttention()
    assert QwenVisionGraphs.why_not(model.visual) == "the tower is not on CUDA"


@torch.inference_mode()
def test_the_adapter_cuts_a_batch_into_runs_by_the_buckets_in_order(qwen):
    tower = QwenVLTower(qwen)
    grids = [(1, 16, 32), (1, 16, 24), (1, 16, 16), (1, 8, 8), (1, 32, 36)]
    units = [EncodeItem(_pixels(qwen, [g], i), g[1] * g[2], "image", None, {"grid": g}) for i, g in enumerate(grids)]
    expected = tower.forward(units)
    tower.graphs = _Recorder([256, 1024])
    outputs = tower.forward(units)
    assert tower.graphs.runs == [512 + 384, 256, 64, 1152]  # 1,024 + 256 + 256 rows: less than 1,024 + 1,024
    for out, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, reference)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "gemma3", "gemma4"])
def test_on_cpu_the_plugin_logs_why_it_captured_nothing_and_serves_eagerly(name, caplog):
    model = sm.BUILDERS[name]()
    bucket = getattr(tower_for(model), "image_patches", 1024)  # Gemma: one image's patches; Qwen: any rows
    caplog.set_level(logging.INFO, logger="mm_scheduler_sglang")
    plugin = {**settings.PLUGIN_DEFAULTS, "vit_graph_patches": [bucket]}
    service = sglang_plugin.start(model, {"config_path": None, "mode": "async", "values": {"budget_bytes": 1 << 30},
                                          "plugin": plugin}, tp_size=1)
    try:
        assert service.tower.graphs is None
        why = ("the tower is not on CUDA" if name == "gemma3"  # SigLIP's graphs take SDPA too (test_uniform_graphs)
               else "its vision attention backend is VisionSdpaAttention")
        assert f"ViT CUDA graphs off: {why}" in caplog.text
    finally:
        sglang_plugin.stop()


def test_buckets_beyond_the_budget_are_dropped_at_start_and_the_rest_captured(qwen, caplog, monkeypatch):
    asked: list[list[int]] = []

    def record(self, buckets, *, tp_size):
        asked.append(list(buckets))
        return "captured nothing (CPU)"

    monkeypatch.setattr(QwenVLTower, "use_graphs", record)
    caplog.set_level(logging.INFO, logger="mm_scheduler_sglang")
    plugin = {**settings.PLUGIN_DEFAULTS, "vit_graph_patches": [4096, 1 << 20]}
    sglang_plugin.start(qwen, {"config_path": None, "mode": "async", "values": {"budget_bytes": 1 << 24},
                               "plugin": plugin}, tp_size=1)
    try:
        assert asked == [[4096]]
        assert f"ViT CUDA graph buckets [{1 << 20}] dropped" in caplog.text and "exceed the budget" in caplog.text
    finally:
        sglang_plugin.stop()
    plugin = {**settings.PLUGIN_DEFAULTS, "vit_graph_patches": [1 << 20]}
    sglang_plugin.start(qwen, {"config_path": None, "mode": "async", "values": {"budget_bytes": 1 << 24},
                               "plugin": plugin}, tp_size=1)
    try:
        assert asked == [[4096]] and "ViT CUDA graphs off: no bucket fits the budget" in caplog.text
    finally:
        sglang_plugin.stop()


def test_a_failed_capture_costs_the_graphs_not_the_plugin(qwen, caplog, monkeypatch):
    def fail(self, buckets, *, tp_size):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(QwenVLTower, "use_graphs", fail)
    caplog.set_level(logging.INFO, logger="mm_scheduler_sglang")
    plugin = {**settings.PLUGIN_DEFAULTS, "vit_graph_patches": [1024]}
    service = sglang_plugin.start(qwen, {"config_path": None, "mode": "async", "values": {"budget_bytes": 1 << 30},
                                         "plugin": plugin}, tp_size=1)
    try:
        assert service is not None and sglang_plugin._service is service
        assert "ViT CUDA graphs off: capture failed (RuntimeError: operation not permitted" in caplog.text
    finally:
        sglang_plugin.stop()


def test_every_forward_of_a_tower_with_graphs_is_counted_replayed_or_eager(qwen, monkeypatch):
    """``mm_coalescer_vit_graph_forwards_total{outcome}``: how an operator sees whether the buckets hold the batches.
    On CPU nothing is captured, so the graphs decline every batch and each forward counts as eager."""
    from prometheus_client import REGISTRY

    def uncaptured(self, buckets, *, tp_size):
        self.graphs = QwenVisionGraphs(self.model.visual, buckets)
        return "captured nothing (CPU)"

    monkeypatch.setattr(QwenVLTower, "use_graphs", uncaptured)
    plugin = {**settings.PLUGIN_DEFAULTS, "vit_graph_patches": [1024]}
    service = sglang_plugin.start(qwen, {"config_path": None, "mode": "async", "values": {"budget_bytes": 1 << 30},
                                         "plugin": plugin}, tp_size=1)
    try:
        labels = {"coalescer": service.config.name}

        def counted(outcome: str) -> float:
            return REGISTRY.get_sample_value("mm_coalescer_vit_graph_forwards_total",
                                             {**labels, "outcome": outcome}) or 0.0

        eager, replayed = counted("eager"), counted("replayed")
        grids = [(1, 8, 8), (1, 4, 8)]
        units = [EncodeItem(_pixels(qwen, [g], i), g[1] * g[2], "image", None, {"grid": g})
                 for i, g in enumerate(grids)]
        with torch.inference_mode():
            service.tower.forward(units)
        assert (counted("eager") - eager, counted("replayed") - replayed) == (1, 0)  # one run, declined
        service.tower.graphs.on_forward(True)  # what a replay reports
        assert counted("replayed") - replayed == 1
    finally:
        sglang_plugin.stop()
