"""benchmarks/pixel_handover.py: SGLang's processors and one-node hand-over, float32 against uint8 pixels."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import pixel_handover

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("family", pixel_handover.FAMILIES)
def test_one_request_a_transport_writes_both_rows_a_quarter_of_the_bytes_and_equal_widened_pixels(
        family, tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        assert pixel_handover.main(["--family", family, "--requests", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / f"pixel_handover_{family}.json").read_text())
    assert result["family"] == family
    rows = {row["transport"]: row for row in result["rows"]}
    assert set(rows) == {"float32", "uint8"}
    assert rows["float32"]["bytes_per_request"] == 4 * rows["uint8"]["bytes_per_request"] > 0
    if family == "gemma4":  # its processor pads each image to 2520 patches of 16x16x3
        assert rows["float32"]["bytes_per_request"] == 6 * 2520 * 768 * 4
    assert result["widened_equal_float32"] is True
    for row in rows.values():
        assert row["preprocess_ms"] > 0 and row["handover_tm_ms"] > 0 and row["handover_scheduler_ms"] >= 0
    assert rows["float32"]["widen_ms"] < rows["uint8"]["widen_ms"]  # float32 pixels are left as they are
    assert f"{family}:" in capsys.readouterr().out
