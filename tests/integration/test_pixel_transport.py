"""``sglang.uint8_pixels``: uint8 image pixels from the tokenizer manager, widened bit for bit where they are used.

The tokenizer manager's side runs SGLang's real processors (``Gemma4SGLangProcessor``, ``QwenVLImageProcessor``,
``Gemma3SGLangImageProcessor``) over the HF processors of the harness's tiny directories
(``scripts/gpu_serve/build_model.py <family>_tiny``: the real models' processor settings, Qwen2.5-VL's CLIP
normalization included), on the CPU as SGLang runs them on a CPU engine. The scheduler's side runs SGLang's real
vision towers (tiny, random weights): the plugin's adapters and SGLang's own ``get_image_feature``, on uint8 pixels
and on the float32 pixels the processor would have sent.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import sglang_models as sm
import torch
from mm_scheduler_sglang import adapters, pixel_transport, settings, sglang_compat, sglang_plugin

pytestmark = pytest.mark.timeout(300)

FAMILIES = ("gemma4", "qwen2_5_vl", "qwen3_vl", "gemma3")
GEMMA4 = pixel_transport.Widening(1 / 255)
QWEN2_5 = pixel_transport.Widening(1 / 255, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALVES = pixel_transport.Widening(1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Qwen3-VL's and Gemma3's processors


@pytest.fixture(autouse=True)
def scheduler_without_service(monkeypatch):
    """A scheduler process of this plugin without a service and without uint8 pixels, unless a test says otherwise
    (other test files leave SGLang's Gemma 4 methods hooked)."""
    monkeypatch.setattr(sglang_plugin, "_service", None)
    monkeypatch.setattr(sglang_plugin, "_widening", None)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    parent = tmp_path_factory.mktemp("models")
    return {family: sm.model_dir(parent, family) for family in FAMILIES}


@pytest.fixture
def sglang_gemma4_processor(model_dirs):
    with sm.mm_processor(model_dirs["gemma4"]) as build:
        yield build


def _processed(mm_processor):
    return sm.process_images(mm_processor, [sm.image_url(480, 360, 1), sm.image_url(300, 500, 2)])


@pytest.mark.parametrize("family", FAMILIES)
def test_sglangs_processor_sends_uint8_pixels_that_its_widening_turns_into_its_float32_pixels_bit_for_bit(
        model_dirs, family):
    with sm.mm_processor(model_dirs[family]) as build:
        wide, narrowed = build(), build()
        widening = pixel_transport.Widening.of(wide._processor.image_processor)
        assert widening == {"gemma4": GEMMA4, "qwen2_5_vl": QWEN2_5}.get(family, HALVES)
        assert pixel_transport.narrow_images(narrowed) is None
        before, after = _processed(wide), _processed(narrowed)
    assert after.input_ids == before.input_ids
    assert len(after.mm_items) == len(before.mm_items) >= 1
    for old, new in zip(before.mm_items, after.mm_items, strict=True):
        assert old.feature.dtype == torch.float32 and new.feature.dtype == torch.uint8
        assert new.feature.nbytes * 4 == old.feature.nbytes
        assert torch.equal(widening(new.feature), old.feature)
        assert new.offsets == old.offsets
        tensors = {k: v for k, v in old.model_specific_data.items() if isinstance(v, torch.Tensor)}  # grids, positions
        assert all(torch.equal(new.model_specific_data[k], v) for k, v in tensors.items())


def test_the_tokenizer_manager_hook_narrows_the_processor_before_any_clone_of_it_is_taken(
        sglang_gemma4_processor, monkeypatch):
    from mm_scheduler_sglang import preprocess

    monkeypatch.setattr(preprocess, "_loop", None)
    mm_processor = sglang_gemma4_processor()
    chosen = {"plugin": {**settings.PLUGIN_DEFAULTS, "uint8_pixels": True, "preprocess_thread": True}}
    try:
        sglang_plugin._after_tokenizer_manager_init(None, SimpleNamespace(mm_processor=mm_processor),
                                                    SimpleNamespace(**{settings.ATTR: chosen}))
        assert all(item.feature.dtype == torch.uint8 for item in _processed(mm_processor).mm_items)
        # Sent by the plugin's clone on its thread, or (0.5.17+, --mm-processor-worker-num above 1) by the clones
        # SGLang's own executor takes of the processor, lazily, at a worker's first call
        assert preprocess.stats()["calls"] == (0 if sglang_compat.processor_runs_off_loop(mm_processor) else 1)
    finally:
        if preprocess._loop is not None:
            preprocess._loop.stop()


@pytest.mark.parametrize(("setting", "why"), [
    ("transport", "features stay on the GPU (--mm-feature-transport cuda_ipc or --keep-mm-feature-on-device)"),
    ("keep_on_device", "features stay on the GPU (--mm-feature-transport cpu or --keep-mm-feature-on-device)"),
    ("pil", "SGLang runs the PIL image processor (--disable-fast-image-processor)"),
    ("architecture", f"['LlavaForConditionalGeneration'] is not one of {list(pixel_transport.ARCHITECTURES)}, whose "
                     "adapters widen uint8 pixels"),
    ("transformers_impl", "TransformersAutoMultimodalProcessor is not SGLang's own processor of the model "
                          "(--model-impl transformers?)"),
    ("ray", "SGLang's schedulers run as Ray actors (--use-ray), which load no plugins"),
    ("skip_tokenizer_init", "SGLang's schedulers load no image processor to widen by (--skip-tokenizer-init)"),
    ("buffer", "SGLANG_MM_BUFFER_SIZE_MB copies features into SGLang's float32 buffer before they could be widened"),
    # normalized, its channel-last patches are a layout the widening does not normalize (nor its 0 padding patches)
    ("normalize", "Gemma4ImageProcessor failed on a probe image (ValueError: uint8 pixels of shape (1, 2520, 768) are "
                  "not [..., C, H, W] with C = 3, the layout a normalizing widening knows)"),
], ids=lambda value: value if " " not in value else "")
def test_pixels_stay_float32_where_uint8_would_not_be_lossless_or_widened(sglang_gemma4_processor, monkeypatch,
                                                                         setting, why):
    mm_processor = sglang_gemma4_processor()
    images = mm_processor._processor.image_processor
    if setting == "transport":
        mm_processor.mm_feature_transport = "cuda_ipc"
    elif setting == "keep_on_device":
        mm_processor.keep_mm_feature_on_device = True
    elif setting == "pil":
        mm_processor.disable_fast_image_processor = True
    elif setting == "architecture":
        mm_processor.hf_config = SimpleNamespace(architectures=["LlavaForConditionalGeneration"])
    elif setting == "transformers_impl":  # what SGLang builds for the same architecture with --model-impl transformers
        mm_processor.__class__ = type("TransformersAutoMultimodalProcessor", (type(mm_processor),), {})
    elif setting == "ray":
        mm_processor.server_args = SimpleNamespace(use_ray=True)
    elif setting == "skip_tokenizer_init":  # the schedulers' image processor is where they read the widening
        mm_processor.server_args = SimpleNamespace(skip_tokenizer_init=True)
    elif setting == "buffer":  # the schedulers inherit the launcher's environment
        monkeypatch.setenv("SGLANG_MM_BUFFER_SIZE_MB", "1")  # the smallest buffer copies them too
    else:
        images.do_normalize, images.image_mean, images.image_std = True, [0.5] * 3, [0.5] * 3
    assert pixel_transport.narrow_images(mm_processor) == why
    assert images.do_rescale is True
    assert images.do_normalize is (setting == "normalize")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_served_through_transformers_model_keeps_float32_pixels_though_sglang_keeps_its_processor(
        model_dirs, family):
    """With ``--model-impl transformers`` SGLang still builds Qwen's own processor (``supports_transformers_backend``)
    but serves transformers' model, whose vision code the plugin does not route: nothing would widen uint8 pixels."""
    with sm.mm_processor(model_dirs[family], model_impl="transformers") as build:
        mm_processor = build()
        assert type(mm_processor).__name__ == "QwenVLImageProcessor"
        assert pixel_transport.narrow_images(mm_processor) == (
            "SGLang serves the model through --model-impl transformers, whose vision code the plugin does not route")
        assert all(item.feature.dtype == torch.float32 for item in _processed(mm_processor).mm_items)
    with sm.mm_processor(model_dirs[family], model_impl="sglang") as build:
        assert pixel_transport.narrow_images(build()) is None


@pytest.mark.parametrize(("impl", "why"), [
    ("TRANSFORMERS", "SGLang serves the model through --model-impl transformers, whose vision code the plugin does not "
                     "route"),
    ("SGLANG", None), ("AUTO", None)])
def test_sglangs_model_impl_enum_is_read_by_its_value(sglang_gemma4_processor, impl, why):
    """SGLang resolves ``model_impl`` to its ``ModelImpl`` enum in places; its ``str()`` is not its value."""
    from sglang.srt.configs.model_config import ModelImpl

    mm_processor = sglang_gemma4_processor()
    mm_processor.server_args.model_impl = getattr(ModelImpl, impl)
    assert pixel_transport.narrow_images(mm_processor) == why


def test_a_processor_rescaling_by_another_factor_sends_uint8_pixels_widened_by_that_factor(sglang_gemma4_processor):
    wide, narrowed = sglang_gemma4_processor(), sglang_gemma4_processor()
    for mm_processor in (wide, narrowed):
        mm_processor._processor.image_processor.rescale_factor = 1 / 127.5
    widening = pixel_transport.Widening.of(wide._processor.image_processor)
    assert widening == pixel_transport.Widening(1 / 127.5)
    assert pixel_transport.narrow_images(narrowed) is None
    for old, new in zip(_processed(wide).mm_items, _processed(narrowed).mm_items, strict=True):
        assert new.feature.dtype == torch.uint8 and torch.equal(widening(new.feature), old.feature)


def test_mm_process_configs_image_settings_of_the_rescale_keep_pixels_float32(sglang_gemma4_processor):
    """SGLang passes ``--mm-process-config``'s image settings with every call, over the processor's attributes."""
    mm_processor = sglang_gemma4_processor()
    mm_processor.image_config = {"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert pixel_transport.narrow_images(mm_processor) == (
        "--mm-process-config sets ['do_normalize', 'image_mean', 'image_std'] for every image")
    assert mm_processor._processor.image_processor.do_rescale is True


class Gemma4SGLangProcessor(SimpleNamespace):
    """Named as SGLang's processor, so that the checks before the probe pass: the probe is what these tests test."""


class _ProbedProcessor:
    """An image processor whose output without its rescale is ``narrow``, a fault the start-up probe must catch."""

    do_rescale = True
    rescale_factor = 1 / 255

    def __init__(self, narrow) -> None:
        self.narrow = narrow
        self.settings: list[dict] = []

    def __call__(self, images, return_tensors, device, **settings):
        self.settings.append(settings)
        if self.do_rescale:
            return {"pixel_values": torch.full((1, 4, 3), 2 / 255)}
        return {"pixel_values": self.narrow()}


def _broken(narrow):
    return Gemma4SGLangProcessor(mm_feature_transport="cpu", disable_fast_image_processor=False, image_config={},
                                 server_args=SimpleNamespace(), _processor=SimpleNamespace(
                                     image_processor=_ProbedProcessor(narrow)),
                                 hf_config=SimpleNamespace(architectures=list(pixel_transport.ARCHITECTURES)))


def _raise():
    raise RuntimeError("no")


def test_a_processor_that_does_not_rescale_is_left_as_it_is():
    mm_processor = _broken(lambda: torch.full((1, 4, 3), 2, dtype=torch.uint8))
    mm_processor._processor.image_processor.do_rescale = False
    assert pixel_transport.narrow_images(mm_processor) == "_ProbedProcessor does not rescale"
    assert mm_processor._processor.image_processor.do_rescale is False


@pytest.mark.parametrize(("narrow", "why"), [
    (lambda: torch.full((1, 4, 3), 2.0), "_ProbedProcessor without rescaling gives torch.float32, not uint8"),
    (lambda: torch.full((1, 4, 3), 3, dtype=torch.uint8),
     "_ProbedProcessor's uint8 output does not widen to its float32 output bit for bit"),
    (_raise, "_ProbedProcessor failed on a probe image (RuntimeError: no)"),
], ids=["float", "other_values", "raises"])
def test_a_processor_whose_probe_is_not_lossless_is_left_rescaling(narrow, why):
    mm_processor = _broken(narrow)
    assert pixel_transport.narrow_images(mm_processor) == why
    assert mm_processor._processor.image_processor.do_rescale is True
    lossless = _broken(lambda: torch.full((1, 4, 3), 2, dtype=torch.uint8))
    assert pixel_transport.narrow_images(lossless) is None
    assert lossless._processor.image_processor.do_rescale is False


def test_the_probe_runs_with_mm_process_configs_other_image_settings():
    """SGLang calls the processor with them (its soft-token budget, say): the probe must see what requests see."""
    mm_processor = _broken(lambda: torch.full((1, 4, 3), 2, dtype=torch.uint8))
    mm_processor.image_config = {"max_soft_tokens": 70}
    assert pixel_transport.narrow_images(mm_processor) is None
    assert mm_processor._processor.image_processor.settings == [{"max_soft_tokens": 70}] * 2


def _pair(family: str, model, seed: int):
    """The same image twice: uint8 pixels as the narrowed processor sends them, and the float32 it would have sent."""
    make = {"gemma4": lambda: sm.gemma4_image(model, 6, 8, 64, seed), "gemma3": lambda: sm.gemma3_image(model, 2, seed)}
    narrow, wide = (make.get(family, lambda: sm.qwen_image(model, 4, 6, seed))() for _ in range(2))
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, narrow.feature.shape, dtype=torch.uint8, generator=generator)
    if family == "gemma4":
        pixels[:, 48:] = 0  # the processor's padding patches
    narrow.feature, wide.feature = pixels, WIDENINGS[family](pixels)
    return narrow, wide


WIDENINGS = {"gemma4": GEMMA4, "qwen2_5_vl": QWEN2_5, "qwen3_vl": HALVES, "gemma3": HALVES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_encodes_uint8_pixels_exactly_as_the_float32_ones_and_as_sglangs_method(family):
    model = sm.BUILDERS[family]()
    tower = adapters.tower_for(model)
    tower.widening = WIDENINGS[family]
    narrow, wide = zip(*(_pair(family, model, seed) for seed in (1, 2)), strict=True)
    from_uint8 = tower.forward([unit for item in narrow for unit in tower.units(item)])
    from_float = tower.forward([unit for item in wide for unit in tower.units(item)])
    assert all(torch.equal(a, b) for a, b in zip(from_uint8, from_float, strict=True))
    assert torch.equal(torch.cat(from_uint8), model.get_image_feature(list(wide)))


@pytest.mark.parametrize("widening", [GEMMA4, QWEN2_5], ids=["rescale", "normalize"])
def test_a_batch_mixing_uint8_and_float32_units_is_widened_per_unit(widening):
    pixels = torch.randint(0, 256, (3, 4, 12), dtype=torch.uint8)
    widened = widening(pixels)
    stacked = adapters.stack_on([pixels, widened, pixels], torch.device("cpu"), torch.bfloat16, widening)
    assert stacked.dtype == torch.bfloat16
    assert torch.equal(stacked, torch.stack([widened] * 3).to(torch.bfloat16))


@pytest.mark.parametrize("family", FAMILIES)
def test_sglangs_own_method_gets_float32_pixels_from_the_service_and_without_one(monkeypatch, family):
    model = sm.BUILDERS[family]()
    narrow, wide = _pair(family, model, 3)
    expected = model.get_image_feature([wide])
    handed = adapters.on_one_device([narrow], torch.device("cpu"), WIDENINGS[family])  # the service's fallback
    assert torch.equal(handed[0].feature, wide.feature)
    narrow, _ = _pair(family, model, 3)
    monkeypatch.setattr(sglang_plugin, "_service", None)  # a plugin that never started, or stopped
    monkeypatch.setattr(sglang_plugin, "_widening", WIDENINGS[family])
    original = type(model).get_image_feature
    assert torch.equal(sglang_plugin._around_get_feature(original, model, [narrow]), expected)


def test_a_request_arriving_at_a_scheduler_without_the_service_has_its_pixels_widened_at_once(monkeypatch):
    model = sm.qwen2_5_vl()
    narrow, wide = _pair("qwen2_5_vl", model, 4)
    monkeypatch.setattr(sglang_plugin, "_service", None)
    monkeypatch.setattr(sglang_plugin, "_widening", QWEN2_5)
    request = SimpleNamespace(multimodal_inputs=SimpleNamespace(mm_items=[narrow, None]), finished=lambda: False)
    scheduler = SimpleNamespace(disaggregation_mode=SimpleNamespace(name="NULL"))
    sglang_plugin._around_add_request_to_queue(lambda *args, **kwargs: None, scheduler, request)
    assert narrow.feature.dtype == torch.float32 and torch.equal(narrow.feature, wide.feature)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 4, 5), (6, 3 * 2 * 4)], ids=["crops", "image", "patches"])
def test_a_widening_normalizes_each_channel_where_the_layout_puts_it(shape):
    """Every uint8 value, in each channel: image tensors carry the channel third from the end, Qwen's flattened
    patches as the slowest part of a row (``[C, temporal, patch, patch]``)."""
    pixels = torch.arange(math.prod(shape), dtype=torch.int64).remainder(256).to(torch.uint8).reshape(shape)
    widened = QWEN2_5(pixels)
    assert widened.dtype == torch.float32 and widened.shape == pixels.shape
    channels = pixels.reshape(shape[0], 3, -1) if len(shape) == 2 else pixels.movedim(-3, 0).reshape(3, -1)
    expect = widened.reshape(shape[0], 3, -1) if len(shape) == 2 else widened.movedim(-3, 0).reshape(3, -1)
    for c in range(3):
        mean, std = torch.tensor(QWEN2_5.mean) * 255.0, torch.tensor(QWEN2_5.std) * 255.0  # transformers' fused
        got = expect[:, c] if len(shape) == 2 else expect[c]
        assert torch.equal(got, (channels[:, c] if len(shape) == 2 else channels[c]).float().sub(mean[c]).div(std[c]))
    assert QWEN2_5(widened) is widened  # float pixels (a fallback's, or another transport's) pass through


@pytest.mark.parametrize("shape", [(2, 5, 16 * 16 * 3), (4, 5, 6), (7,), (6, 3 * 2 * 4 + 1)],
                         ids=["channel_last_patches", "four_channels", "flat", "ragged_patches"])
def test_a_normalizing_widening_refuses_a_layout_it_cannot_place_the_channels_of(shape):
    """Normalizing per channel needs to know where the channel is: pixels in another layout (Gemma 4's channel-last
    patches, were its processor told to normalize) raise instead of being normalized by the wrong channel."""
    with pytest.raises(ValueError, match="with C = 3"):
        QWEN2_5(torch.zeros(shape, dtype=torch.uint8))
    assert GEMMA4(torch.zeros(shape, dtype=torch.uint8)).shape == shape  # a rescale alone needs no layout


def test_a_widening_with_one_mean_and_std_for_all_channels_normalizes_any_layout():
    one = pixel_transport.Widening(1 / 255, (0.5,), (0.25,))
    pixels = torch.arange(240, dtype=torch.uint8).reshape(2, 5, 24)
    expected = (pixels.float() - torch.tensor(0.5) * 255.0) / (torch.tensor(0.25) * 255.0)
    assert torch.equal(one(pixels), expected) and torch.equal(one(pixels[0]), expected[0])


def test_widening_of_an_image_processor_reads_its_rescale_and_normalize_settings():
    def images(**settings):
        return SimpleNamespace(**{"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                                  "image_mean": [0.5] * 3, "image_std": [0.5] * 3, **settings})

    assert pixel_transport.Widening.of(images()) == HALVES
    assert pixel_transport.Widening.of(images(do_normalize=False)) == GEMMA4
    assert pixel_transport.Widening.of(images(do_rescale=False)) is None
    assert pixel_transport.Widening.of(images(image_mean=0.5, image_std=0.25)).mean == (0.5,)
    assert pixel_transport.Widening.of(None) is None  # a scheduler without a processor (--skip-tokenizer-init)


def test_the_tokenizer_manager_is_hooked_for_uint8_pixels_alone(monkeypatch):
    registered: list = []
    monkeypatch.setattr(sglang_plugin.HookRegistry, "register", lambda target, hook, kind: registered.append(target))
    monkeypatch.setattr(sglang_plugin.HookRegistry, "apply_hooks", lambda: None)
    monkeypatch.setattr(sglang_plugin, "_tokenizer_manager_hooked", False)
    sglang_plugin._hook_tokenizer_manager({"plugin": {**settings.PLUGIN_DEFAULTS, "uint8_pixels": True}})
    assert registered == [sglang_compat.TOKENIZER_MANAGER_INIT]


def test_without_the_setting_or_for_another_model_uint8_features_are_left_as_sglang_sent_them(monkeypatch):
    """SGLang 0.5.23's Kimi-K3 sends raw uint8 pixels on purpose and its model insists on them; the plugin is loaded
    into every SGLang server, so only a scheduler that asked for uint8 pixels widens them."""
    monkeypatch.setattr(sglang_plugin, "_service", None)
    monkeypatch.setattr(sglang_plugin, "_widening", None)
    raw = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    item = SimpleNamespace(feature=raw)
    request = SimpleNamespace(multimodal_inputs=SimpleNamespace(mm_items=[item]), finished=lambda: False)
    scheduler = SimpleNamespace(disaggregation_mode=SimpleNamespace(name="NULL"))
    sglang_plugin._around_add_request_to_queue(lambda *args, **kwargs: None, scheduler, request)
    assert sglang_plugin._around_get_feature(lambda model, items: items[0].feature, object(), [item]) is raw


@pytest.mark.parametrize(("family", "setting", "mode", "processor", "widening"), [
    ("gemma4", True, "NULL", True, GEMMA4), ("qwen2_5_vl", True, "NULL", True, QWEN2_5),
    ("qwen3_vl", True, "NULL", True, HALVES), ("gemma3", True, "NULL", True, HALVES),
    ("gemma4", False, "NULL", True, None),
    ("qwen2_5_vl", True, "NULL", False, None),  # --skip-tokenizer-init: no processor, and no uint8 pixels sent
    ("gemma4", True, "DECODE", True, None)])  # a PD decode server never encodes: nothing to widen
def test_a_scheduler_widens_by_its_own_image_processor_only_with_the_setting_and_a_model_whose_tm_narrows(
        monkeypatch, model_dirs, family, setting, mode, processor, widening):
    """The scheduler reads the widening from the HF processor SGLang's ``Scheduler.init_tokenizer`` loads, built here
    by SGLang's own ``get_processor`` from the family's directory, as the tokenizer manager's is."""
    from sglang.srt.utils.hf_transformers_utils import get_processor

    model = sm.BUILDERS[family]()
    chosen = {"plugin": {**settings.PLUGIN_DEFAULTS, "uint8_pixels": setting}, "values": {}}
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)),
                                disaggregation_mode=SimpleNamespace(name=mode),
                                processor=get_processor(str(model_dirs[family])) if processor else None)
    started: list = []
    monkeypatch.setattr(sglang_plugin, "_start_for_scheduler", lambda scheduler, chosen: started.append(chosen))
    monkeypatch.setattr(sglang_plugin, "_widening", GEMMA4 if widening is None else None)
    sglang_plugin._around_scheduler_init(lambda *args, **kwargs: None, scheduler,
                                         SimpleNamespace(**{settings.ATTR: chosen}))
    assert sglang_plugin._widening == widening and started == [chosen]


def test_a_scheduler_whose_image_processor_settings_cannot_be_read_starts_sglang_with_one_error(monkeypatch, caplog):
    """The tokenizer manager's narrowing fails on the same settings and sends float32: SGLang serves, plugin off."""
    images = SimpleNamespace(do_rescale=True, rescale_factor=None, do_normalize=False)
    chosen = {"plugin": {**settings.PLUGIN_DEFAULTS, "uint8_pixels": True}, "values": {}}
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=sm.qwen3_vl())),
                                disaggregation_mode=SimpleNamespace(name="NULL"),
                                processor=SimpleNamespace(image_processor=images))
    built: list = []
    monkeypatch.setattr(sglang_plugin, "_widening", HALVES)
    with caplog.at_level(logging.ERROR, logger="mm_scheduler_sglang.sglang_plugin"):
        sglang_plugin._around_scheduler_init(lambda *args, **kwargs: built.append(args), scheduler,
                                             SimpleNamespace(**{settings.ATTR: chosen}))
    assert len(built) == 1 and sglang_plugin._widening is None and sglang_plugin.active_service() is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "mm-coalescer: the plugin failed to start; SGLang encodes media with its own method"]


def test_a_scheduler_whose_service_fails_to_start_still_widens_what_its_tokenizer_manager_narrowed(monkeypatch):
    images = SimpleNamespace(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3)
    chosen = {"plugin": {**settings.PLUGIN_DEFAULTS, "uint8_pixels": True}, "values": {}}
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=SimpleNamespace(model=sm.qwen3_vl())),
                                disaggregation_mode=SimpleNamespace(name="NULL"),
                                processor=SimpleNamespace(image_processor=images))

    def fails(scheduler, chosen):
        raise RuntimeError("no service")

    monkeypatch.setattr(sglang_plugin, "_start_for_scheduler", fails)
    sglang_plugin._around_scheduler_init(lambda *args, **kwargs: None, scheduler,
                                         SimpleNamespace(**{settings.ATTR: chosen}))
    assert sglang_plugin.active_service() is None and sglang_plugin._widening == HALVES  # the arrival hook widens
