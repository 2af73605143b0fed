"""The EPD benchmark runs end to end on CPU (tiny Qwen2.5-VL tower), so it cannot rot unnoticed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_epd_bench_smoke_completes_every_request_in_both_modes_and_matches_sglang_batches(tmp_path):
    from benchmarks import epd_bench

    out = tmp_path / "epd.json"
    epd_bench.main(["--smoke", "--duration", "0.3", "--burst", "6", "--min-requests", "2", "--out", str(out)])
    report = json.loads(out.read_text())

    assert set(report) == {"meta", "saturation", "loads", "targets", "crosscheck"}
    assert report["meta"]["sglang_capacity_rps"] > 0
    for mode in epd_bench.MODES:
        burst = report["saturation"][mode]
        assert burst["done"] == burst["requests"] == 6 and burst["errors"] == 0
    assert [(row["load"], row["mode"]) for row in report["loads"]] == \
        [(load, mode) for load in epd_bench.LOADS for mode in epd_bench.MODES]
    for row in report["loads"]:
        assert row["requests"] >= 1 and row["done"] == row["requests"] and row["errors"] == 0, row
        assert row["throughput_rps"] > 0 and row["latency_p50_ms"] is not None
    assert {"saturation_speedup", "p50_ratio_at_10pct", "throughput_ratio_at_150pct"} <= set(report["targets"])
    # sglang is installed here: the reproduction formed exactly the batches SGLang's own EncoderScheduler forms
    check = report["crosscheck"]
    assert check is not None and check["match"], check
    batches = check["sglang"]
    assert all(len(ids) == 1 for modality, ids in batches if modality == "video")  # video per request
    assert max(len(ids) for modality, ids in batches if modality == "image") > 1  # images fused ...
    assert all(len(ids) <= epd_bench.SGLANG_MAX_BATCH_SIZE for _, ids in batches)  # ... at most 8 per drain
