"""The ViT CUDA graphs of Gemma 4 and Gemma3 (integration/uniform_graphs.py), all of it that runs without CUDA: how a
batch is cut into replays, which batch sizes the configured patch buckets give, the captured body on a padded static
batch against SGLang's own ``get_image_feature`` (real tiny models), the adapters' runs and fallbacks, the idle
path's routing, and what they say when they cannot capture (what the plugin logs on CPU: test_vit_graphs.py).

Capture and replay themselves, the stream ordering and the copy-out are in tests/gpu/test_uniform_graphs_cuda.py.
"""

from __future__ import annotations

import itertools

import pytest
import sglang_models as sm
import torch
from mm_scheduler_sglang.adapters import Gemma3Tower, Gemma4Tower, _takes_batches
from mm_scheduler_sglang.uniform_graphs import (
    Gemma3VisionGraphs,
    Gemma4VisionGraphs,
    _Batch,
    batch_runs,
    images_per_bucket,
)


def _padded_cost(runs, sizes, replay_images):
    return sum(min(s for s in sizes if s >= b - a) + replay_images for a, b in runs)


@pytest.mark.parametrize("count, sizes, expected", [
    (5, [1, 2, 3], [(0, 3), (3, 5)]),  # 3 + 2, not 3 + 3 padded
    (3, [1, 2, 3], [(0, 3)]),
    (7, [1, 2, 4, 8], [(0, 4), (4, 6), (6, 7)]),  # a padded image costs more than two more replays
    (3, [2, 4], [(0, 3)]),  # one replay of 4 beats two of 2, which pad as many
    (1, [2, 3], [(0, 1)]),  # below the smallest size: padded
    (0, [1, 2], []),
    (4, [], []),
])
def test_a_batch_is_cut_into_consecutive_replays_that_pad_the_fewest_images(count, sizes, expected):
    assert batch_runs(count, sizes) == expected


def test_the_cut_is_the_cheapest_of_all_cuts_and_covers_every_image_once_in_order():
    for sizes in ([1], [1, 2, 3], [2, 3], [1, 4], [3, 5, 8]):
        for count in range(1, 13):
            runs = batch_runs(count, sizes, replay_images=0.25)
            assert [a for a, _ in runs] == [0] + [b for _, b in runs[:-1]] and runs[-1][1] == count
            assert all(b - a <= max(sizes) for a, b in runs)
            best = min(_padded_cost(list(zip((0, *cuts), (*cuts, count), strict=True)), sizes, 0.25)
                       for k in range(count) for cuts in itertools.combinations(range(1, count), k)
                       if all(b - a <= max(sizes) for a, b in zip((0, *cuts), (*cuts, count), strict=True)))
            assert _padded_cost(runs, sizes, 0.25) == best


def test_patch_buckets_give_the_batch_sizes_of_default_budget_images_they_hold():
    assert images_per_bucket([2520, 5040, 7560], 2520) == [1, 2, 3]
    assert images_per_bucket([4096, 8192, 16384, 28672], 2520) == [1, 3, 6, 11]
    assert images_per_bucket([1024], 2520) == []


@pytest.fixture
def gemma4():
    return sm.BUILDERS["gemma4"]()


def _images(model, grids, patches):
    return [sm.gemma4_image(model, gh, gw, patches, seed) for seed, (gh, gw) in enumerate(grids, start=1)]


GRIDS = [(8, 8), (4, 12), (28, 40)]  # two small images and one that fills the default budget


@torch.inference_mode()
def test_the_captured_body_on_a_padded_batch_equals_sglangs_own_method(gemma4):
    """What a replay computes, run eagerly: two images padded to a batch of three with an all-padding image, the
    projection over every pooled slot, then the pooler's mask: SGLang's ``get_image_feature`` per image."""
    if not _takes_batches(gemma4.vision_tower):
        pytest.skip("this SGLang's SDPA vision attention takes one image a forward (flatten_batch)")
    tower = Gemma4Tower(gemma4)
    patches = tower.image_patches
    items = _images(gemma4, GRIDS[:2], patches)
    graphs = Gemma4VisionGraphs(gemma4, patches, [3])
    batch = _Batch(3, graphs._static_inputs(3, torch.device("cpu")), graphs.padding)
    batch.inputs[0].fill_(5)  # what an earlier batch left in the buffers
    batch.load([torch.cat([item.feature for item in items]),
                torch.cat([item.model_specific_data["image_position_ids"] for item in items])])
    assert (batch.inputs[1][2] == -1).all() and (batch.inputs[0][2] == 0).all()
    got = graphs._read(graphs._forward(batch), 2)
    assert [rows.shape[0] for rows in got] == [tower.output_tokens(item) for item in items]  # one tensor an image
    torch.testing.assert_close(torch.cat(got), gemma4.get_image_feature(items), rtol=1e-4, atol=1e-5)


class _Recorder:
    """Stands in for captured graphs: records each run's batch size; replays by the tower's own forward for
    sizes in ``replays``, declines the rest (the caller then runs the tower)."""

    def __init__(self, tower: Gemma4Tower, sizes: list[int], replays: set[int] | None = None) -> None:
        self.tower, self.patches, self.sizes = tower, tower.image_patches, sizes
        self.replays = set(sizes) if replays is None else replays
        self.calls: list[int] = []
        self.fail = False

    def runs(self, count):
        return batch_runs(count, self.sizes)

    def holds(self, *inputs):
        return inputs[0].shape[1] == self.patches

    def run(self, *inputs):
        if self.fail:
            raise RuntimeError("replay failed")
        self.calls.append(int(inputs[0].shape[0]))
        return self.tower._eager(*inputs) if inputs[0].shape[0] in self.replays else None


@torch.inference_mode()
def test_the_adapter_replays_runs_in_order_and_runs_declined_ones_itself(gemma4):
    tower = Gemma4Tower(gemma4)
    units = [u for item in _images(gemma4, GRIDS * 2, tower.image_patches)[:5] for u in tower.units(item)]
    expected = tower.forward(units)
    tower.graphs = _Recorder(tower, [1, 2, 3], replays={3})
    outputs = tower.forward(units)
    assert tower.graphs.calls == [3, 2]  # 3 replayed, 2 declined: the tower's own forward
    for out, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, reference)


@torch.inference_mode()
def test_a_batch_of_another_patch_count_is_one_declined_run(gemma4):
    tower = Gemma4Tower(gemma4)
    units = [u for item in _images(gemma4, GRIDS[:2], 64) for u in tower.units(item)]
    tower.graphs = _Recorder(tower, [1, 2], replays=set())
    tower.forward(units)
    assert tower.graphs.calls == [2]  # counted as an eager forward by the real graphs


@torch.inference_mode()
def test_the_idle_path_encodes_held_images_itself_and_leaves_the_rest_to_sglang(gemma4):
    tower = Gemma4Tower(gemma4)
    tower.graphs = _Recorder(tower, [1, 2, 3])
    own_calls = []

    def own_method(items):
        own_calls.append(len(items))
        return gemma4.get_image_feature(items)

    images = _images(gemma4, GRIDS, tower.image_patches)
    torch.testing.assert_close(tower.encode_now(images, own_method), gemma4.get_image_feature(images),
                               rtol=1e-4, atol=1e-5)
    assert own_calls == [] and tower.graphs.calls == [3]
    other_budget = _images(gemma4, GRIDS[:1], 64)  # another soft-token budget: another patch count
    tower.encode_now(images[:1] + other_budget, own_method)
    tower.graphs.fail = True
    tower.encode_now(images[:1], own_method)
    assert own_calls == [2, 1]


@torch.inference_mode()
def test_an_item_holding_several_images_is_encoded_in_its_order_as_sglang_does(gemma4):
    if not _takes_batches(gemma4.vision_tower):
        pytest.skip("this SGLang's own method fails on an item of two images (SDPA flatten_batch)")
    tower = Gemma4Tower(gemma4)
    tower.graphs = _Recorder(tower, [1, 2, 3])
    pixels, positions = sm._gemma4_patches(gemma4, 2, 8, 12, tower.image_patches, seed=7)
    pair = sm.make_item("image", pixels, 4242, image_position_ids=positions)  # one item, two images
    items = [pair, *_images(gemma4, GRIDS[:1], tower.image_patches)]
    torch.testing.assert_close(tower.encode_now(items, lambda _: pytest.fail("left to SGLang")),
                               gemma4.get_image_feature(items), rtol=1e-4, atol=1e-5)
    assert tower.graphs.calls == [3]


def test_buckets_that_hold_no_default_image_capture_nothing_and_say_so(gemma4, monkeypatch):
    monkeypatch.setattr(Gemma4VisionGraphs, "why_not", staticmethod(lambda model: None))
    tower = Gemma4Tower(gemma4)
    assert tower.use_graphs([tower.image_patches - 4], tp_size=1) == (
        f"ViT CUDA graphs off: no bucket holds one image of {tower.image_patches} patches")
    assert tower.use_graphs([tower.image_patches], tp_size=2).endswith("sharded over TP ranks (its collectives "
                                                                      "would be captured)")
    assert tower.graphs is None


@pytest.fixture
def gemma3():
    return sm.BUILDERS["gemma3"]()


class _CropRecorder(_Recorder):
    def holds(self, *inputs):
        return True  # one crop shape


@torch.inference_mode()
def test_gemma3_crops_are_cut_into_replays_in_order_and_declined_runs_run_siglip_itself(gemma3):
    tower = Gemma3Tower(gemma3)
    units = [u for seed in range(3) for u in tower.units(sm.gemma3_image(gemma3, 2, seed))]  # 6 crops
    expected = tower.forward(units)
    tower.graphs = _CropRecorder(tower, [1, 2, 4], replays={4})
    outputs = tower.forward(units)
    assert tower.graphs.calls == [4, 2]
    for out, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(out, reference)


@torch.inference_mode()
def test_gemma3s_idle_path_encodes_crops_itself_as_sglang_returns_them(gemma3):
    tower = Gemma3Tower(gemma3)
    tower.graphs = _CropRecorder(tower, [1, 2, 4])
    items = [sm.gemma3_image(gemma3, crops, 10 + crops) for crops in (1, 2)]
    torch.testing.assert_close(tower.encode_now(items, lambda _: pytest.fail("left to SGLang")),
                               gemma3.get_image_feature(items), rtol=1e-4, atol=1e-5)
    assert tower.graphs.calls == [2, 1]  # 3 crops: a replay of 2, then 1 (4 would pad one)


def test_gemma3s_static_crops_are_siglips_resolution_and_pad_to_zero(gemma3):
    graphs = Gemma3VisionGraphs(gemma3, Gemma3Tower(gemma3).image_patches, [2])
    size = gemma3.config.vision_config.image_size
    batch = _Batch(2, graphs._static_inputs(2, torch.device("cpu")), graphs.padding)
    batch.inputs[0].fill_(5)
    crop = torch.randn(1, 3, size, size)
    batch.load([crop])
    assert batch.inputs[0].shape == (2, 3, size, size)
    assert torch.equal(batch.inputs[0][0], crop[0]) and (batch.inputs[0][1] == 0).all()


@torch.inference_mode()
def test_gemma3s_captured_body_on_a_padded_batch_equals_sglangs_own_method(gemma3):
    """The captured body on SGLang's SDPA (one of the two backends it is captured on; the adapter unsets SigLIP's
    ``flatten_batch``): two crops padded to a batch of three, against the model's own method."""
    tower = Gemma3Tower(gemma3)
    items = [sm.gemma3_image(gemma3, 2, 21)]
    graphs = Gemma3VisionGraphs(gemma3, tower.image_patches, [3])
    batch = _Batch(3, graphs._static_inputs(3, torch.device("cpu")), graphs.padding)
    batch.inputs[0].fill_(5)
    batch.load([items[0].feature])
    got = graphs._read(graphs._forward(batch), 2)
    assert [rows.shape[0] for rows in got] == [1, 1]  # one tensor a crop
    torch.testing.assert_close(torch.cat(got), gemma3.get_image_feature(items), rtol=1e-4, atol=1e-5)


def test_a_batch_loaded_with_nothing_is_all_padding_and_batch_sizes_are_positive_distinct_and_sorted(gemma3):
    """Capture's warm-up loads no inputs: every slot is a padding image (what an earlier batch left is overwritten)."""
    graphs = Gemma3VisionGraphs(gemma3, Gemma3Tower(gemma3).image_patches, [0, 4, 1, 4, 2])
    assert graphs.sizes == [1, 2, 4]
    batch = _Batch(2, graphs._static_inputs(2, torch.device("cpu")), graphs.padding)
    batch.inputs[0].fill_(5)
    batch.load([])
    assert batch.images == 2 and (batch.inputs[0] == 0).all()


def test_gemma3s_graphs_take_sdpa_or_triton_attention_and_gemma4s_only_triton(gemma3):
    """SigLIP passes its attention no ``cu_seqlens`` (test_adapters: the premise), so SGLang's SDPA there builds no mask
    and reads nothing back: capturable once the adapter unsets ``flatten_batch``. Gemma 4 on SDPA passes a mask that
    padding images would fill with fully masked rows: triton only. On CPU the next reason is the device."""
    from sglang.srt.layers.attention.vision import VisionTritonAttention

    attentions = [m for m in gemma3.vision_tower.modules() if hasattr(m, "qkv_backend")]
    assert {type(m.qkv_backend).__name__ for m in attentions} == {"VisionSdpaAttention"}
    assert Gemma3VisionGraphs.why_not(gemma3) == "its SDPA vision attention takes one image a forward (flatten_batch)"
    Gemma3Tower(gemma3)  # unsets flatten_batch
    assert Gemma3VisionGraphs.why_not(gemma3) == "the tower is not on CUDA"
    attentions[0].qkv_backend = VisionTritonAttention()
    assert Gemma3VisionGraphs.why_not(gemma3) == ("its vision attention layers mix backends (VisionSdpaAttention, "
                                                  "VisionTritonAttention); graphs need --mm-attention-backend "
                                                  "triton_attn or sdpa")
    for module in attentions:
        module.qkv_backend = VisionTritonAttention()
    assert Gemma3VisionGraphs.why_not(gemma3) == "the tower is not on CUDA"
    gemma4 = sm.BUILDERS["gemma4"]()
    assert Gemma4VisionGraphs.why_not(gemma4) == ("its vision attention backend is VisionSdpaAttention; graphs need "
                                                  "--mm-attention-backend triton_attn")
    for module in gemma4.vision_tower.modules():
        if hasattr(module, "qkv_backend"):
            module.qkv_backend = VisionTritonAttention()
    assert Gemma4VisionGraphs.why_not(gemma4) == "the tower is not on CUDA"
    no_attention = type("Model", (), {"vision_tower": torch.nn.Linear(2, 2)})()
    assert Gemma3VisionGraphs.why_not(no_attention) == ("its vision attention backend is unknown; graphs need "
                                                        "--mm-attention-backend triton_attn or sdpa")


@torch.inference_mode()
def test_siglips_captured_body_on_sdpa_reads_nothing_back_to_the_host_and_builds_no_mask(gemma3):
    """What makes SDPA capturable for SigLIP, on this SGLang: while the captured body runs on a padded batch, no tensor
    is read to the host (``item``, ``tolist``, ``cpu``, a truth value) and every SDPA call gets no mask. A future
    SGLang that built SigLIP's mask from ``cu_seqlens`` (a ``.cpu()`` a layer) would fail here, not in a capture."""
    from torch.overrides import TorchFunctionMode

    reads, masks = [], []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name in ("item", "tolist", "cpu", "__bool__", "numpy"):
                reads.append(name)
            if func is torch.nn.functional.scaled_dot_product_attention:
                masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
            return func(*args, **kwargs)

    tower = Gemma3Tower(gemma3)
    graphs = Gemma3VisionGraphs(gemma3, tower.image_patches, [3])
    batch = _Batch(3, graphs._static_inputs(3, torch.device("cpu")), graphs.padding)
    batch.load([sm.gemma3_image(gemma3, 2, 5).feature])
    with Watch():
        graphs._forward(batch)
    assert reads == [] and len(masks) == gemma3.config.vision_config.num_hidden_layers
    assert all(mask is None for mask in masks)
