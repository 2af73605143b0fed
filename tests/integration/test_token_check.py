"""``sglang.fast_mm_token_check``: the HF processors' image-token check of transformers 5.17 on an older transformers,
with SGLang's own processors (SGLang 0.5.16 pins transformers 5.12.1, whose check iterates tensors; 0.5.23 pins
5.19.0, which has the fix)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import sglang_models as sm
import torch
import transformers
from mm_scheduler_sglang import settings, sglang_plugin, token_check
from transformers import processing_utils

MIXIN = processing_utils.ProcessorMixin
OLD_TRANSFORMERS = tuple(int(part) for part in transformers.__version__.split(".")[:2]) < token_check.FIXED_IN
needs_old_transformers = pytest.mark.skipif(not OLD_TRANSFORMERS, reason="this transformers has the check of 5.17")


@pytest.fixture
def transformers_own_check():
    """transformers' own check (conftest puts it back after every test)."""
    own = MIXIN.__dict__["_check_special_mm_tokens"]
    assert own.__module__ == "transformers.processing_utils"
    return own


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    parent = tmp_path_factory.mktemp("models")
    return {family: sm.model_dir(parent, family) for family in ("qwen2_5_vl", "qwen3_vl", "gemma4")}


def _processed(mm_processor):
    return sm.process_images(mm_processor, [sm.image_url(240, 200, 1), sm.image_url(240, 200, 2)])


@needs_old_transformers
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma4"])
def test_on_an_old_transformers_sglangs_processors_check_image_tokens_without_iterating_a_tensor(
        model_dirs, family, monkeypatch):
    """transformers 5.12.1 counted ``list(row).count(id)`` on the ``input_ids`` tensor: a tensor per token. With the
    check installed SGLang's processor gives the same output and never iterates a tensor there."""
    with sm.mm_processor(model_dirs[family]) as build:
        mm_processor = build()
        before = _processed(mm_processor)
        inside: list[bool] = []  # while the check runs
        iterated: list[int] = []  # sizes of the tensors iterated inside the check
        tensor_iter = torch.Tensor.__iter__

        def counting_iter(self):
            if inside:
                iterated.append(self.numel())
            return tensor_iter(self)

        def watched(check):
            def run(self, *args, **kwargs):
                inside.append(True)
                try:
                    return check(self, *args, **kwargs)
                finally:
                    inside.pop()
            return run

        monkeypatch.setattr(torch.Tensor, "__iter__", counting_iter)
        MIXIN._check_special_mm_tokens = watched(MIXIN.__dict__["_check_special_mm_tokens"])
        _processed(mm_processor)
        assert iterated  # transformers' own check iterates the input_ids rows, a tensor per token
        iterated.clear()
        assert token_check.install() is None
        installed = MIXIN.__dict__["_check_special_mm_tokens"]
        MIXIN._check_special_mm_tokens = watched(installed)
        after = _processed(mm_processor)
        monkeypatch.setattr(torch.Tensor, "__iter__", tensor_iter)
    assert iterated == [] and installed is token_check.check_special_mm_tokens
    assert torch.equal(torch.as_tensor(after.input_ids), torch.as_tensor(before.input_ids))
    for old, new in zip(before.mm_items, after.mm_items, strict=True):
        assert torch.equal(new.feature, old.feature)


ROWS = [[5, 7, 7, 1], [7, 3, 0, 0]]  # two prompts: two image tokens (id 7), then one


@pytest.mark.parametrize("input_ids", [torch.tensor(ROWS), torch.tensor(ROWS, dtype=torch.int32), ROWS,
                                       torch.tensor(ROWS).numpy()], ids=["tensor", "int32", "lists", "numpy"])
def test_the_check_counts_and_refuses_a_truncated_prompt_as_transformers_own_does(transformers_own_check, input_ids):
    from transformers import BatchFeature

    # a modality is counted only with both its token and its id (a processor without an audio token id skips it)
    processor = SimpleNamespace(image_token="<img>", image_token_id=7, video_token=None, video_token_id=None,
                                audio_token="<aud>", audio_token_id=None)
    for inputs in ({"input_ids": input_ids}, BatchFeature({"input_ids": input_ids})):
        for check in (transformers_own_check, token_check.check_special_mm_tokens):
            check(processor, ["a<img><img>b<aud>", "<img>c"], inputs, ["image", "video", "audio"])
        errors = []
        for check in (transformers_own_check, token_check.check_special_mm_tokens):
            with pytest.raises(ValueError) as raised:
                check(processor, ["a<img><img><img>b", "<img>c"], inputs, ["image"])
            errors.append(str(raised.value))
        assert errors[0] == errors[1] and "Got ids=[2, 1] and text=[3, 1]" in errors[1]


def test_a_transformers_with_the_fix_keeps_its_own_check(monkeypatch, transformers_own_check):
    monkeypatch.setattr(token_check, "transformers_version", lambda: "5.17.0")
    assert token_check.install() == (
        "transformers 5.17.0 has the check of 5.17 (huggingface/transformers#47580) already")
    assert MIXIN.__dict__["_check_special_mm_tokens"] is transformers_own_check


@needs_old_transformers
def test_installing_twice_installs_once(transformers_own_check):
    assert token_check.install() is None and token_check.install() is None
    assert MIXIN.__dict__["_check_special_mm_tokens"] is token_check.check_special_mm_tokens


@pytest.mark.parametrize("setting", [True, False])
def test_the_tokenizer_manager_hook_installs_the_check_only_with_the_setting(setting, transformers_own_check, caplog):
    chosen = {"plugin": {**settings.PLUGIN_DEFAULTS, "uint8_pixels": False, "fast_mm_token_check": setting}}
    tokenizer_manager = SimpleNamespace(mm_processor=object())
    with caplog.at_level(logging.INFO, logger="mm_scheduler_sglang.sglang_plugin"):
        sglang_plugin._after_tokenizer_manager_init(None, tokenizer_manager, SimpleNamespace(**{settings.ATTR: chosen}))
    lines = [r.getMessage() for r in caplog.records if "fast_mm_token_check" in r.getMessage()]
    installed = MIXIN.__dict__["_check_special_mm_tokens"] is token_check.check_special_mm_tokens
    if not setting:
        assert lines == [] and not installed
    elif OLD_TRANSFORMERS:
        assert installed and lines == ["mm-coalescer: sglang.fast_mm_token_check: HF processors count image tokens "
                                       "as transformers 5.17 does"]
    else:
        assert not installed and lines == [
            f"mm-coalescer: sglang.fast_mm_token_check has no effect: transformers {transformers.__version__} has the "
            "check of 5.17 (huggingface/transformers#47580) already"]
