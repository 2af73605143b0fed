"""Tower adapters on the real SGLang model classes (tiny, CPU): which models are taken, which items each
takes and how it splits them, the key that decides result sharing, the declared memory accounting and
calibration probes, batching and dtype in forwards, and CUDA-IPC / CUDA-VMM feature proxies.

Models come from ``sglang_models`` (real SGLang classes; see its docstring for the Gemma4 assembly).
The transport proxies are SGLang's own classes, constructed on CPU; rebuilding one needs CUDA and a
second process (CUDA refuses to open an IPC handle in the process that exported it), which
``tests/gpu/test_adapters_cuda.py`` does.
"""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import sglang_models as sm
import torch
from mm_scheduler_sglang import adapters, sglang_compat
from mm_scheduler_sglang.adapters import (
    SUPPORTED_MODELS,
    feature_shape,
    materialize_feature,
    tower_for,
    why_unsupported,
)
from torch import nn

from mm_scheduler import EncodeItem


@pytest.fixture(scope="module", params=list(sm.BUILDERS))
def family_model(request):
    return request.param, sm.BUILDERS[request.param]()


@pytest.fixture(scope="module")
def qwen3():
    return sm.qwen3_vl()


@pytest.fixture(scope="module")
def qwen2_5():
    return sm.qwen2_5_vl()


class _SwappedClass:
    """Run a block with ``model`` re-typed as ``cls`` (same layout, as a subclass instance would be)."""

    def __init__(self, model: nn.Module, cls: type) -> None:
        self.model, self.cls, self.original = model, cls, type(model)

    def __enter__(self) -> nn.Module:
        self.model.__class__ = self.cls
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.__class__ = self.original


# --- selection -----------------------------------------------------------------------------------
def test_each_supported_class_gets_an_adapter(family_model):
    _, model = family_model
    assert adapters.qualified_name(type(model)) in SUPPORTED_MODELS
    assert why_unsupported(model) is None
    assert isinstance(tower_for(model), adapters.SGLangTower)


def test_allow_list_names_the_real_classes_with_their_encoder_methods():
    """Every entry resolves to an SGLang class defining (or inheriting) the methods the plugin hooks."""
    assert len(SUPPORTED_MODELS) == 5
    for path, methods in SUPPORTED_MODELS.items():
        cls = adapters._resolve(path)
        assert adapters.qualified_name(cls) == path
        assert all(callable(getattr(cls, m, None)) for m in methods)


def test_subclasses_of_supported_classes_are_refused(qwen3):
    from sglang.srt.models.qwen3_5 import Qwen3_5ForConditionalGeneration
    from sglang.srt.models.qwen3_vl import Qwen3VLForConditionalGeneration

    class LocalQwen3VL(Qwen3VLForConditionalGeneration):
        pass

    subclasses = [LocalQwen3VL, Qwen3_5ForConditionalGeneration]
    if importlib.util.find_spec("sglang.srt.models.cosmos3") is not None:  # not in 0.5.16
        from sglang.srt.models.cosmos3 import Cosmos3ForConditionalGeneration

        subclasses.append(Cosmos3ForConditionalGeneration)
    for cls in subclasses:
        with _SwappedClass(qwen3, cls) as model:
            reason = why_unsupported(model)
            assert reason is not None and "not one of the supported classes" in reason
            assert tower_for(model) is None
    assert tower_for(qwen3) is not None


def test_gemma4_unified_subclass_is_refused():
    from sglang.srt.models.gemma4_unified import Gemma4UnifiedForConditionalGeneration

    with _SwappedClass(sm.gemma4(), Gemma4UnifiedForConditionalGeneration) as model:
        assert "not one of the supported classes" in why_unsupported(model)


def test_a_lookalike_class_with_a_supported_name_is_refused(qwen3):
    lookalike = type("Qwen3VLForConditionalGeneration", (nn.Module,),
                     {"__module__": "sglang.srt.models.qwen3_vl", "__qualname__": "Qwen3VLForConditionalGeneration"})
    with _SwappedClass(qwen3, lookalike) as model:
        assert "not the class SGLang defines" in why_unsupported(model)


def test_language_model_only_qwen3_vl_is_refused():
    """The real class, built as SGLang builds it with ``language_model_only``: no vision tower at all."""
    from sglang.srt.models.qwen3_vl import Qwen3VLForConditionalGeneration

    config = sm.qwen3_vl().config
    config.language_model_only = True
    model = Qwen3VLForConditionalGeneration(config)
    if model.visual is not None:
        pytest.skip("this SGLang builds Qwen3-VL's tower whatever language_model_only says (0.5.16)")
    assert "has no visual" in why_unsupported(model)
    assert tower_for(model) is None


def test_gemma4_without_its_vision_encoder_is_refused():
    """A later pipeline stage holds ``PPMissingLayer`` where the vision tower would be."""
    from sglang.srt.layers.utils import PPMissingLayer

    model = sm.gemma4()
    model.vision_tower = PPMissingLayer()
    assert f"vision_tower is {adapters.qualified_name(PPMissingLayer)}," in why_unsupported(model)


def test_a_model_lacking_the_vision_attribute_altogether_is_refused(qwen2_5):
    visual = qwen2_5.visual
    del qwen2_5.visual
    try:
        assert "has no visual" in why_unsupported(qwen2_5)
    finally:
        qwen2_5.visual = visual
    assert why_unsupported(qwen2_5) is None


def test_a_supported_name_from_a_module_that_is_not_loaded_is_refused(qwen3, monkeypatch):
    """The class is only trusted if SGLang's loaded module defines it under that name."""
    import sys

    monkeypatch.delitem(sys.modules, "sglang.srt.models.qwen3_vl")
    assert "not the class SGLang defines" in why_unsupported(qwen3)


class _ParametersOn(nn.Module):
    """A model whose weights report ``device`` (no GPU here to put real ones on)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.on = device

    def parameters(self, recurse: bool = True):
        yield type("Weight", (), {"device": self.on})()


def test_a_model_on_the_bare_cuda_device_is_pinned_to_the_current_gpu(monkeypatch):
    """The coalescer's forward thread selects the GPU by index: a bare ``cuda`` becomes the current one."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert adapters._model_device(_ParametersOn(torch.device("cuda"))) == torch.device("cuda", 3)
    assert adapters._model_device(_ParametersOn(torch.device("cuda", 1))) == torch.device("cuda", 1)
    assert adapters._model_device(_ParametersOn(torch.device("cpu"))) == torch.device("cpu")


def test_vit_cuda_graph_env_refuses_qwen3_vl(qwen3, monkeypatch):
    """Qwen3-VL reads SGLANG_VIT_ENABLE_CUDA_GRAPH on every vision forward and then returns views of
    the graph's static output buffer: the plugin must leave that model to SGLang."""
    monkeypatch.setenv("SGLANG_VIT_ENABLE_CUDA_GRAPH", "1")
    reason = why_unsupported(qwen3)
    assert reason is not None and "SGLANG_VIT_ENABLE_CUDA_GRAPH" in reason
    assert tower_for(qwen3) is None
    monkeypatch.delenv("SGLANG_VIT_ENABLE_CUDA_GRAPH")
    assert why_unsupported(qwen3) is None


def test_vit_cuda_graph_refuses_qwen2_5_vl_only_when_its_tower_uses_it(qwen2_5, monkeypatch):
    """Qwen2.5-VL decides once, at construction (``enable_cg = is_cuda and env``): on CPU the env alone
    changes nothing; a tower built with the graph runner is refused."""
    monkeypatch.setenv("SGLANG_VIT_ENABLE_CUDA_GRAPH", "1")
    assert why_unsupported(qwen2_5) is None
    monkeypatch.setattr(qwen2_5.visual, "enable_cg", True)
    assert "SGLANG_VIT_ENABLE_CUDA_GRAPH" in why_unsupported(qwen2_5)
    monkeypatch.delattr(qwen2_5.visual, "enable_cg")  # a tower that has no graph runner at all
    assert why_unsupported(qwen2_5) is None


# --- the key of a shared result ----------------------------------------------------------------------
def test_same_hash_different_grid_gives_different_keys_and_outputs(qwen3):
    """SGLang hashes the preprocessed pixel bytes only (``tensor_hash`` flattens), so a 4x8 and an 8x4
    patch grid of the same rows get the same ``item.hash`` yet encode differently."""
    from sglang.srt.managers.mm_utils import hash_feature

    tower = tower_for(qwen3)
    pixels = torch.randn(32, tower.patch_dim, generator=torch.Generator().manual_seed(7))
    wide = sm.make_item("image", pixels.clone(), hash_feature(pixels), image_grid_thw=torch.tensor([[1, 4, 8]]))
    tall = sm.make_item("image", pixels.clone(), hash_feature(pixels), image_grid_thw=torch.tensor([[1, 8, 4]]))
    assert wide.hash == tall.hash
    assert tower.result_key(wide) != tower.result_key(tall)
    with torch.no_grad():
        out_wide, out_tall = tower.forward(tower.units(wide) + tower.units(tall))
    assert not torch.allclose(out_wide, out_tall, atol=1e-3)


def test_key_includes_token_count_and_is_stable_for_equal_items(qwen3):
    """SGLang's own batch dedup keys on (hash, placeholder token count); so does ours, and an item
    whose spans are not set yet counts the rows its layout gives (4x4 patches, merge 2: 4 tokens)."""
    tower = tower_for(qwen3)
    a, b = sm.qwen_image(qwen3, 4, 4, 1), sm.qwen_image(qwen3, 4, 4, 1)
    a.offsets = [(3, 6)]
    assert tower.result_key(a) == tower.result_key(b)
    b.offsets = [(10, 13)]
    assert tower.result_key(a) == tower.result_key(b)  # where the tokens sit does not matter
    b.offsets = [(10, 12)]
    assert tower.result_key(a) != tower.result_key(b)


def test_token_count_from_layout_equals_the_encoders_rows(family_model):
    import inspect

    _, model = family_model
    tower = tower_for(model)
    items = [_one_item(model)]
    if type(model).__name__.startswith("Gemma4"):
        frames = sm.gemma4_video_frames(model)
        items.append(sm.gemma4_video(model, frames, 4, 4, 16, 4))
        # 3x3 real patches per frame, pooled 2x2: each frame rounds up on its own (3 tokens, not 9/4 of one)
        items.append(sm.gemma4_video(model, frames, 3, 3, 12, 5))
    for item in items:
        method = inspect.unwrap(getattr(type(model), f"get_{item.modality.name.lower()}_feature"))
        with torch.no_grad():
            out = method(model, [item])
        rows = out.reshape(-1, out.shape[-1]).shape[0]  # Gemma3 returns [crops, tokens, hidden]
        assert tower.output_tokens(item) == rows == sm.tokens_of(model, item)


def test_gemma4_tokens_and_bytes_follow_its_pooling_kernel():
    """Real Gemma4 checkpoints pool 3x3 patches per soft token: rows and output bytes must divide by
    ``kernel**2`` (9), rounding each image up, as SGLang's own method does."""
    model = sm.gemma4(pooling_kernel_size=3)
    tower = tower_for(model)
    for gh, gw in [(6, 6), (4, 5)]:
        item = sm.gemma4_image(model, gh, gw, 36, gh * gw)
        with torch.no_grad():
            out = inspect.unwrap(type(model).get_image_feature)(model, [item])
        assert tower.output_tokens(item) == out.shape[0] == -(-gh * gw // 9)
        assert out.nbytes <= tower.output_bytes(item) <= 2 * out.nbytes


def test_gemma4_key_follows_position_ids():
    """Same pixel bytes and hash, another patch layout: Gemma4's output depends on the positions."""
    model = sm.gemma4()
    tower = tower_for(model)
    square = sm.gemma4_image(model, 4, 4, 16, 1)
    flat = sm.gemma4_image(model, 2, 8, 16, 1)
    flat.feature = square.feature.clone()
    assert square.hash == flat.hash
    assert tower.result_key(square) != tower.result_key(flat)


def test_unit_keys_carry_the_result_key(family_model):
    _, model = family_model
    tower = tower_for(model)
    items = [_one_item(model)]
    if type(model).__name__.startswith("Qwen"):  # a video: temporal slices (Qwen3-VL) or one clip (Qwen2.5-VL)
        items.append(sm.qwen_video(model, 3, 4, 4, 4))
    for item in items:
        units = tower.units(item)
        assert [u.key for u in units] == [(tower.result_key(item), i) for i in range(len(units))]
        item.hash = None
        assert tower.result_key(item) is None and all(u.key is None for u in tower.units(item))


def test_qwen3_videos_become_temporal_slices_and_qwen2_5_videos_one_clip(qwen3, qwen2_5):
    """Qwen3-VL attends within each frame, so a video is ``t`` frame slices of ``h*w`` patches (they batch
    with images); Qwen2.5-VL's full attention spans the clip, so its video is one unit of ``t*h*w``."""
    t, h, w = 3, 4, 4
    (sliced,) = tower_for(qwen3).units(sm.qwen_video(qwen3, t, h, w, 1))
    assert sliced.pixel_values.shape[0] == t and sliced.num_patches == h * w and sliced.meta["grid"] == (1, h, w)
    (clip,) = tower_for(qwen2_5).units(sm.qwen_video(qwen2_5, t, h, w, 1))
    assert clip.pixel_values.shape[0] == 1 and clip.num_patches == t * h * w and clip.meta["grid"] == (t, h, w)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_item_of_several_images_is_one_unit_per_grid_row(family):
    """SGLang may bundle images in one item (one ``image_grid_thw`` row each, pixel rows concatenated):
    each row's patches become a unit, and the assembled result is what SGLang's method returns."""
    model = sm.BUILDERS[family]()
    tower = tower_for(model)
    first, second, third = (sm.qwen_image(model, h, w, seed) for h, w, seed in [(4, 4, 1), (2, 6, 2), (4, 6, 3)])
    item = sm.make_item("image", torch.cat([first.feature, second.feature, third.feature]), 77,
                        image_grid_thw=torch.tensor([[1, 4, 4], [1, 2, 6], [1, 4, 6]]))
    assert tower.accepts(item)
    units = tower.units(item)
    for unit, single in zip(units, [first, second, third], strict=True):
        assert torch.equal(unit.pixel_values, single.feature)
    with torch.no_grad():
        got = tower.assemble(item, tower.forward(units))
        expected = inspect.unwrap(type(model).get_image_feature)(model, [item])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def test_gemma4_key_follows_the_dtype_of_position_ids():
    """The positions' digest covers their dtype: the same bytes read as another dtype are other positions."""
    tower = tower_for(sm.gemma4())
    item = sm.gemma4_image(tower.model, 4, 4, 16, 1)
    other = sm.gemma4_image(tower.model, 4, 4, 16, 1)
    positions = other.model_specific_data["image_position_ids"]
    other.model_specific_data["image_position_ids"] = positions.view(torch.float64)
    assert feature_shape(item) == feature_shape(other) and item.hash == other.hash
    assert tower.result_key(item) != tower.result_key(other)


def test_gemma3_units_count_the_patches_siglip_runs():
    """A crop's budgeted ``num_patches`` is the sequence SigLIP runs on it, ``(image_size / patch_size)**2``."""
    model = sm.gemma3()
    tower = tower_for(model)
    units = tower.units(sm.gemma3_image(model, 2, 1)) + tower.probe_units(tower.probe_patch_counts[0])
    with torch.no_grad():
        sequence = model.vision_tower(pixel_values=units[0].pixel_values[None]).shape[1]
    assert sequence == (64 // 8) ** 2
    assert all(u.num_patches == sequence for u in units)


def _one_item(model: nn.Module):
    name = type(model).__name__
    if name.startswith("Qwen"):
        return sm.qwen_image(model, 4, 8, 3)
    if name.startswith("Gemma3"):
        return sm.gemma3_image(model, 2, 3)
    return sm.gemma4_image(model, 4, 8, 64, 3)


# --- calibration probes -------------------------------------------------------------------------------
def test_probes_follow_calibrate_protocol_and_encode(family_model):
    """``calibrate_tower`` calls ``probe_units(n)`` for each of ``probe_patch_counts`` (at least two
    different sizes) and forwards them; every probe unit must pass the tower's own checks."""
    from mm_scheduler.planner import Planner
    from mm_scheduler.units import why_invalid

    family, model = family_model
    tower = tower_for(model)
    counts = tower.probe_patch_counts
    assert len(counts) >= 2 and len(set(counts)) == len(counts)
    planner = Planner(ragged=tower.ragged, bytes_per_patch=tower.bytes_per_patch, budget_bytes=1 << 40,
                      max_batch_items=1024)
    for n in counts[:2]:  # the largest is the same shapes, more of them
        units = tower.probe_units(n)
        assert sum(u.num_patches for u in units) == n
        assert all(u.pixel_values.device == tower.device and u.pixel_values.dtype == torch.float32 for u in units)
        assert all(why_invalid(u, planner, getattr(tower, "validate", None)) is None for u in units)
        if not tower.ragged:
            assert len({u.num_patches for u in units}) == 1
        with torch.no_grad():
            outputs = tower.forward(units)
        assert len(outputs) == len(units)
        assert all(torch.isfinite(o).all() and o.shape[-1] == _width(model) for o in outputs)
        if family.startswith("qwen"):
            merge = tower.merge ** 2
            assert [o.shape[0] for o in outputs] == [u.num_patches // merge for u in units]


# One block's MLP matrices (each as wide as ``intermediate_size``): gate+up+down, or fc1+fc2.
MLP_MATRICES = {"qwen2_5_vl": 3, "qwen3_vl": 2, "gemma3": 2, "gemma4": 3}


def test_declared_bytes_per_patch_counts_one_blocks_live_activations(family_model):
    """Where it is not measured (CPU, TP lockstep) the budget divides by the declared ``bytes_per_patch``:
    one block's live activations per patch, residual + q/k/v + attention output (5 x hidden) and the
    MLP's widths, in the model's dtype (float32 here)."""
    family, model = family_model
    vcfg = model.config.vision_config
    expected = (5 * vcfg.hidden_size + MLP_MATRICES[family] * vcfg.intermediate_size) * 4
    bytes_per_patch = tower_for(model).bytes_per_patch
    assert isinstance(bytes_per_patch, int) and bytes_per_patch == expected


def test_probe_sizes_are_growing_whole_numbers_of_typical_images(family_model):
    """``calibrate`` fits a line through the probes' peaks: three growing sizes, each a whole number of
    the tower's typical probe image (so every probe is the same shapes, more of them)."""
    _, model = family_model
    tower = tower_for(model)
    one, *more = tower.probe_patch_counts
    assert len(more) == 2 and one < more[0] < more[1]
    assert all(isinstance(n, int) and n % one == 0 for n in more)


def test_qwen_probes_are_typical_square_images_then_one_merge_high_strip(qwen3):
    """Probe images are ``PROBE_SIDE`` patches square; a count that is not a whole number of them ends
    with one ``merge``-high image of the rest (rounded down to whole merged tokens, at least one)."""
    tower = tower_for(qwen3)
    side, merge = tower.PROBE_SIDE, tower.merge
    grids = lambda n: [u.meta["grid"] for u in tower.probe_units(n)]  # noqa: E731
    assert grids(side * side) == [(1, side, side)]
    assert grids(2 * side * side) == [(1, side, side)] * 2
    assert grids(side * side + 3 * merge * merge) == [(1, side, side), (1, merge, 3 * merge)]
    assert grids(3 * merge * merge + 1) == [(1, merge, 3 * merge)]
    assert grids(1) == [(1, merge, merge)]
    units = tower.probe_units(side * side + 3 * merge * merge)
    assert [u.num_patches for u in units] == [side * side, 3 * merge * merge]
    with torch.no_grad():
        outputs = tower.forward(units)
    assert [o.shape[0] for o in outputs] == [side * side // merge**2, 3]


def test_qwen_units_must_have_whole_merged_tokens_on_both_sides(qwen3):
    """A grid whose height or width is not a multiple of ``spatial_merge_size`` is refused before it runs."""
    tower = tower_for(qwen3)
    m = tower.merge
    tower.validate(EncodeItem(torch.zeros(1), 4 * m * m, "image", None, {"grid": (1, 2 * m, 2 * m)}))
    for grid in [(1, 2 * m + 1, 2 * m), (1, 2 * m, 2 * m + 1), (1, m + 1, m + 1)]:
        with pytest.raises(ValueError):
            tower.validate(EncodeItem(torch.zeros(1), grid[1] * grid[2], "image", None, {"grid": grid}))


def test_qwen_accepts_patch_rows_that_match_their_grid(qwen3):
    """Qwen takes ``[patches, patch_dim]`` rows whose count is the grid's ``t*h*w`` total, with the grid
    under the modality's own name; no grid, another width or row count, or embeddings stay with SGLang."""
    tower = tower_for(qwen3)
    dim = tower.patch_dim
    item = lambda modality, shape, **grids: sm.make_item(modality, torch.zeros(shape), 1, **grids)  # noqa: E731
    grid = torch.tensor([[1, 4, 4]])
    assert tower.accepts(item("image", (16, dim), image_grid_thw=grid))
    assert tower.accepts(item("video", (32, dim), video_grid_thw=torch.tensor([[2, 4, 4]])))
    assert not tower.accepts(item("image", (16, dim)))
    assert not tower.accepts(item("video", (16, dim), image_grid_thw=grid))
    assert not tower.accepts(item("image", (16, dim - 1), image_grid_thw=grid))
    assert not tower.accepts(item("image", (15, dim), image_grid_thw=grid))
    assert not tower.accepts(item("image", (1, 16, dim), image_grid_thw=grid))
    embedded = item("image", (16, dim), image_grid_thw=grid)
    embedded.precomputed_embeddings = torch.zeros(4, 64)
    assert not tower.accepts(embedded)


def _width(model: nn.Module) -> int:
    visual = getattr(model, "visual", None)
    return visual.out_hidden_size if visual is not None else model.config.text_config.hidden_size


# --- CUDA-IPC / CUDA-VMM proxies ------------------------------------------------------------------------
def _ipc_proxy(tensor: torch.Tensor):
    """SGLang's real proxy, as ``MmItemMemoryPool.wrap_tensor`` builds it (the pool slice is bytes)."""
    proxy_cls = sglang_compat.cuda_ipc_proxy_class()
    data = torch.empty(tensor.numel() * tensor.element_size(), dtype=torch.uint8)
    if "sync_buffer_meta" in inspect.signature(proxy_cls).parameters:  # 0.5.16/0.5.17's shared-memory flag
        return proxy_cls(data=data, info_data=tensor, sync_buffer_meta=None, pool_ipc_handle=(0, b"handle"))
    return proxy_cls(data=data, info_data=tensor, pool_ipc_handle=(0, b"handle"),
                     pool_byte_offset=0, ready_byte_offset=0, ack_byte_offset=4, generation=1,
                     total_consumer_count=1, use_pool_handle_cache=True)


def _vmm_proxy(tensor: torch.Tensor):
    if importlib.util.find_spec("sglang.srt.utils.cuda_vmm_transport_utils") is None:
        pytest.skip("this SGLang has no CUDA-VMM transport (0.5.16)")
    from sglang.srt.utils.cuda_vmm_transport_utils import CudaVmmTensorTransportProxy

    return CudaVmmTensorTransportProxy(fabric_handle=None, posix_socket_path=None, allocation_size=0, data_offset=0,
                                       data_nbytes=tensor.numel() * tensor.element_size(), control_offset=0,
                                       consumer_count=1, shape=tensor.shape, dtype=tensor.dtype)


@pytest.mark.parametrize("wrap", [_ipc_proxy, _vmm_proxy], ids=["cuda_ipc", "cuda_vmm"])
def test_transport_proxy_is_judged_by_the_layout_it_describes(qwen3, wrap):
    """Qwen3-VL's deferred CUDA-IPC items reach arrival as proxies: their key and acceptance follow the
    tensor they rebuild to; a tower on CPU (where SGLang never rebuilds them) leaves them alone."""
    tower = tower_for(qwen3)
    plain = sm.qwen_image(qwen3, 4, 8, 5)
    proxied = sm.qwen_image(qwen3, 4, 8, 5)
    proxied.feature = wrap(plain.feature)
    assert adapters.is_transport_proxy(proxied.feature)
    assert feature_shape(proxied) == plain.feature.shape
    assert tower.result_key(proxied) == tower.result_key(plain)
    assert tower.output_bytes(proxied) == tower.output_bytes(plain)
    assert tower.accepts(plain) and not tower.accepts(proxied)
    with pytest.raises(ValueError, match="CUDA device"):
        materialize_feature(proxied, tower.device)

    on_cuda = tower_for(qwen3)
    on_cuda.device = torch.device("cuda", 0)  # what it would say on a GPU: proxies become acceptable
    assert on_cuda.accepts(proxied)
    bad = sm.qwen_image(qwen3, 4, 8, 5)
    bad.feature = wrap(plain.feature[:, :-1])  # described rows no longer match the patch size
    assert not on_cuda.accepts(bad)


def test_materialize_leaves_plain_tensors_untouched(family_model):
    _, model = family_model
    item = _one_item(model)
    feature = item.feature
    assert materialize_feature(item, torch.device("cpu")) is feature


# --- what each tower accepts ----------------------------------------------------------------------------
def _gemma3_accepts(tower, shape, modality="image", **extra) -> bool:
    item = sm.make_item(modality, torch.zeros(shape), 1, **extra)
    return tower.accepts(item)


def test_gemma3_accepts_crops_of_its_resolution_only():
    """Gemma3 takes ``[3, S, S]`` crops, batched on up to two leading axes, at its one resolution ``S``;
    anything else (another size on either axis, no crop axes, videos, precomputed embeddings) stays
    with SGLang."""
    model = sm.gemma3()
    tower = tower_for(model)
    s = tower.image_size
    for shape in [(3, s, s), (2, 3, s, s), (1, 2, 3, s, s)]:
        assert _gemma3_accepts(tower, shape), shape
    for shape in [(s, s), (1, 1, 2, 3, s, s), (2, 3, s // 2, s), (2, 3, s, s // 2), (3, s // 2, s)]:
        assert not _gemma3_accepts(tower, shape), shape
    assert not _gemma3_accepts(tower, (2, 3, s, s), modality="video")
    embedded = sm.make_item("image", torch.zeros(2, 3, s, s), 1)
    embedded.precomputed_embeddings = torch.zeros(2 * model.config.mm_tokens_per_image, 64)
    assert not tower.accepts(embedded)


def test_gemma4_accepts_patch_rows_with_matching_position_ids_only():
    """Gemma4 takes ``[..., P, patch_pixels]`` (one image, or frames on up to two leading axes) with
    position ids of the same leading shape under the modality's own name; other widths, missing or
    misshapen positions, and deeper nesting stay with SGLang."""
    tower = tower_for(sm.gemma4())
    width, p = tower.patch_pixels, 16

    def accepts(shape, modality="image", positions="same", name=None):
        name = name or ("video_position_ids" if modality == "video" else "image_position_ids")
        extra = {}
        if positions is not None:
            extra[name] = torch.zeros(*(shape[:-1] if positions == "same" else positions), 2, dtype=torch.long)
        return tower.accepts(sm.make_item(modality, torch.zeros(shape), 1, **extra))

    for shape in [(p, width), (1, p, width), (1, 3, p, width)]:
        assert accepts(shape), shape
        assert accepts(shape, modality="video"), shape
    assert not accepts((1, 1, 1, p, width))
    assert not accepts((width,))
    assert not accepts((1, p, width - 1))
    assert not accepts((1, p, width), positions=None)
    assert not accepts((1, p, width), positions=(1, p - 1))
    assert not accepts((1, p, width), modality="video", name="image_position_ids")
    assert not accepts((1, p, width), name="video_position_ids")


# --- batching, dtype, device ------------------------------------------------------------------------------
def _set_flatten_batch(vision_tower: nn.Module, on: bool) -> None:
    """What the attention backend decides: SGLang's SDPA with ``flatten_batch`` asserts batch size 1."""
    from sglang.srt.layers.attention.vision import VisionSdpaAttention

    for module in vision_tower.modules():
        if isinstance(module, VisionSdpaAttention):
            module.flatten_batch = on


def _batch_sizes(vision_tower: nn.Module) -> tuple[list[int], object]:
    sizes: list[int] = []

    def record(module, args, kwargs):
        sizes.append((kwargs.get("pixel_values") if "pixel_values" in kwargs else args[0]).shape[0])

    return sizes, vision_tower.register_forward_pre_hook(record, with_kwargs=True)


def test_gemma4_batches_exactly_when_its_attention_takes_batches():
    """One vision forward for all units where SGLang's attention takes a batch; one per unit where it asserts batch
    size 1 (SDPA ``flatten_batch``: Gemma4 in 0.5.16/0.5.17). Same outputs. (SigLIP: the next test.)"""
    model = sm.gemma4()
    units = [u for seed in (1, 2, 3) for u in tower_for(model).units(sm.gemma4_image(model, 4, 4, 16, seed))]
    outputs = {}
    for flatten in (True, False):
        _set_flatten_batch(model.vision_tower, flatten)
        tower = tower_for(model)
        sizes, hook = _batch_sizes(model.vision_tower)
        try:
            with torch.no_grad():
                outputs[flatten] = tower.forward(units)
        finally:
            hook.remove()
        assert sizes == ([1] * len(units) if flatten else [len(units)]), (flatten, sizes)
    assert len(outputs[True]) == len(outputs[False]) == len(units)
    for one_by_one, batched in zip(outputs[True], outputs[False], strict=True):
        torch.testing.assert_close(one_by_one, batched, atol=1e-4, rtol=1e-3)


def test_siglip_hands_its_attention_no_cu_seqlens_so_its_crops_run_as_one_batch_with_sglangs_own_result(
        monkeypatch):
    """What makes unsetting SigLIP's ``flatten_batch`` safe (adapters._let_siglip_batch): SGLang's SDPA attention
    builds a mask only from ``cu_seqlens``, and SigLIP never passes one (nor a mask), so the plugin's one forward of
    all crops equals SGLang's own method, run first with the flag as SGLang set it."""
    from sglang.srt.layers.attention.vision import VisionSdpaAttention

    model = sm.gemma3()
    seen: list = []
    forward = VisionSdpaAttention.forward
    monkeypatch.setattr(VisionSdpaAttention, "forward", lambda self, *args, **kwargs: seen.append(
        (kwargs.get("cu_seqlens"), kwargs.get("attention_mask"), self.flatten_batch)) or forward(self, *args, **kwargs))
    item = sm.gemma3_image(model, 3, 11)
    with torch.no_grad():
        own = model.get_image_feature([item])
        assert seen and all(cu is None and mask is None and flatten for cu, mask, flatten in seen)
        seen.clear()
        tower = tower_for(model)
        sizes, hook = _batch_sizes(model.vision_tower)
        try:
            batched = torch.cat(list(tower.forward(tower.units(item))))
        finally:
            hook.remove()
    assert sizes == [3]
    assert seen and all(cu is None and mask is None and not flatten for cu, mask, flatten in seen)
    torch.testing.assert_close(batched, own.reshape(batched.shape), atol=1e-5, rtol=1e-4)


def test_bf16_model_gets_float32_pixels_cast_and_two_byte_accounting(family_model):
    """The processor hands float32 pixels; a bf16 model's tower must cast them as SGLang's own method
    does, return what that method returns, and count 2-byte activations and outputs."""
    family, fp32_model = family_model
    model = sm.BUILDERS[family]().to(torch.bfloat16)
    tower, fp32_tower = tower_for(model), tower_for(fp32_model)
    assert tower.bytes_per_patch * 2 == fp32_tower.bytes_per_patch
    item = _one_item(model)
    assert item.feature.dtype == torch.float32
    with torch.no_grad():
        expected = inspect.unwrap(type(model).get_image_feature)(model, [item])
        got = tower.assemble(item, tower.forward(tower.units(item)))
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)
    assert tower.output_bytes(item) * 2 == fp32_tower.output_bytes(_one_item(fp32_model))
    if family == "gemma4":  # an upper bound (padding patches); exact for the others
        assert expected.nbytes <= tower.output_bytes(item) <= 2 * expected.nbytes
    else:
        assert tower.output_bytes(item) == expected.nbytes


def test_probes_are_made_on_the_towers_device(family_model):
    """Calibration probes live where the tower runs (as CUDA-IPC pixels would), not on the default device."""
    _, model = family_model
    tower = tower_for(model)
    tower.device = torch.device("meta")  # any device other than the default one
    units = tower.probe_units(tower.probe_patch_counts[0])
    assert units and all(u.pixel_values.device.type == "meta" for u in units)


class _StubStream:
    """Stands in for ``torch.cuda.current_stream(device)`` on this CPU machine: records what it waits on."""

    def __init__(self, calls: list, device) -> None:
        self.calls, self.device = calls, device

    def wait_event(self, event) -> None:
        self.calls.append((self.device, event))


def test_materialize_makes_the_cuda_stream_wait_for_the_items_pending_copy(qwen3, monkeypatch):
    """On a CUDA tower, the current stream of the tower's device waits for the host/device copy event
    SGLang recorded on the item (and only when there is one); on CPU the event is never looked at."""
    key = sglang_compat.cuda_ipc_copy_event_key()
    if key is None:
        pytest.skip("this SGLang records no pending-copy event")
    waits: list = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _StubStream(waits, device))
    device = torch.device("cuda", 1)
    pending, plain = sm.qwen_image(qwen3, 4, 4, 1), sm.qwen_image(qwen3, 4, 4, 2)
    event = object()
    pending.model_specific_data[key] = event
    assert materialize_feature(pending, device) is pending.feature
    assert waits == [(device, event)]
    assert pending.model_specific_data[key] is event  # left for SGLang's own path
    assert materialize_feature(plain, device) is plain.feature
    assert materialize_feature(pending, torch.device("cpu")) is pending.feature
    assert waits == [(device, event)]


@pytest.mark.parametrize("wrap", [_ipc_proxy, _vmm_proxy], ids=["cuda_ipc", "cuda_vmm"])
def test_materialize_rebuilds_a_proxy_on_the_towers_gpu_in_place(qwen3, wrap, monkeypatch):
    """SGLang's own ``item.reconstruct(device_index)`` runs with the tower's GPU current, and the item
    then holds the plain tensor (the rebuild itself, out of the shared pool, is stubbed: no CUDA here)."""
    item = sm.qwen_image(qwen3, 4, 8, 5)
    rebuilt = item.feature
    item.feature = proxy = wrap(rebuilt)
    targets, current = [], []
    monkeypatch.setattr(type(proxy), "reconstruct_on_target_device",
                        lambda self, target, **kw: targets.append(target) or rebuilt, raising=False)

    class CurrentDevice:
        def __init__(self, device) -> None:
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc) -> None:
            current.append(None)

    monkeypatch.setattr(torch.cuda, "device", CurrentDevice)
    device = torch.device("cuda", 1)
    assert materialize_feature(item, device) is rebuilt
    assert item.feature is rebuilt and targets == [1] and current == [device, None]


def test_features_that_are_neither_tensors_nor_proxies_are_left_to_sglang(family_model):
    """A feature SGLang has not turned into one tensor (a list of tensors, say) has no layout to judge."""
    _, model = family_model
    item = _one_item(model)
    item.feature = [item.feature]
    assert not adapters.is_transport_proxy(item.feature)
    assert feature_shape(item) is None
    assert not tower_for(model).accepts(item)


def test_units_on_two_devices_are_stacked_on_the_towers_device():
    """A cuda_ipc batch can hold Gemma crops rebuilt on the GPU beside crops on the CPU, and ``torch.stack``
    refuses two devices. On a CPU machine the meta device stands in for the GPU."""
    on_gpu, on_cpu = torch.ones(3, 4, device="meta"), torch.ones(3, 4)
    with pytest.raises(RuntimeError):
        torch.stack([on_gpu, on_cpu])
    stacked = adapters.stack_on([on_gpu, on_cpu], torch.device("meta"), torch.bfloat16)
    assert stacked.device.type == "meta" and stacked.dtype == torch.bfloat16 and stacked.shape == (2, 3, 4)
    same = adapters.stack_on([torch.ones(3, 4), torch.zeros(3, 4)], torch.device("cpu"))
    assert torch.equal(same, torch.stack([torch.ones(3, 4), torch.zeros(3, 4)]))  # one device: plain stack
