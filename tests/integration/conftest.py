"""Shared setup for the SGLang integration tests (CPU, real sglang package)."""

import os
import sys
from pathlib import Path

import pytest

# SGLang's vision rotary helpers are torch.compile'd; eager mode computes the same and saves ~20 s.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _transformers_own_token_check():
    """``sglang.fast_mm_token_check`` (on by default) replaces a transformers method process-wide wherever a test
    runs the tokenizer manager's hook: every test starts and ends with transformers' own."""
    from transformers import processing_utils

    mixin = processing_utils.ProcessorMixin
    own = mixin.__dict__["_check_special_mm_tokens"]
    assert own.__module__ == "transformers.processing_utils", "a test before this one left the plugin's check in place"
    yield
    mixin._check_special_mm_tokens = own
