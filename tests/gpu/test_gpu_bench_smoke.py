"""The GPU benchmark script itself runs end to end (tiny towers on CPU), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).parents[2]


def test_gpu_bench_runs_all_modes_and_loads_on_tiny_towers(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_bench", "--tower", "siglip", "--tiny", "--device", "cpu",
           "--out", str(tmp_path), "--step-seconds", "0.2", "--min-requests", "8", "--drain-seconds", "0.2",
           "--sweep-seconds", "0.05", "--reps", "2"]
    subprocess.run(cmd, cwd=REPO, check=True, timeout=240, capture_output=True)
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    siglip = report["towers"]["siglip"]
    assert [load["load"] for load in siglip["loads"]] == [0.1, 0.5, 0.9, 1.5]
    for load in siglip["loads"]:
        assert set(load["modes"]) == {"per_item", "per_request", "coalescer"}
    assert siglip["limit"]["patches_per_s"] > 0 and "overload_throughput_ratio" in siglip["targets"]
