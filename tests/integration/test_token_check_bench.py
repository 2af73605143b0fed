"""benchmarks/token_check.py: SGLang's processors with transformers' own image-token check and the installed one."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import token_check

pytestmark = pytest.mark.timeout(300)


def test_one_request_a_check_writes_both_rows_and_the_same_token_ids(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert token_check.main(["--family", "qwen3_vl", "--requests", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "token_check.json").read_text())
    family = result["families"]["qwen3_vl"]
    assert [row["check"] for row in family["rows"]] == ["transformers", "installed"]
    assert family["same_input_ids"] is True
    # transformers 5.19 (SGLang 0.5.23) may not call the check at all for this processor: 0 ms then
    assert all(0 <= row["check_ms"] < row["request_ms"] for row in family["rows"])
    from transformers import processing_utils

    assert "_check_special_mm_tokens" in processing_utils.ProcessorMixin.__dict__  # transformers' own, put back
    assert processing_utils.ProcessorMixin._check_special_mm_tokens.__module__ == "transformers.processing_utils"
    assert "qwen3_vl:" in capsys.readouterr().out
