"""The two-rank TP benchmark runs end to end on CPU (gloo, tiny shapes), so the GPU script cannot rot.

It checks what the GPU run checks: TP=2 equals the unsharded tower, a jittered soak runs identical
forwards with bitwise-identical outputs on both ranks, and a failure injected on rank 1 only
(a real failed allocation, an exception after the collectives) sends both ranks down the same path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[2]


def test_tp_benchmark_smoke_agrees_across_ranks_and_matches_the_unsharded_tower(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.tp_nccl", "--smoke", "--out", str(tmp_path),
           "--collective-timeout-s", "60", "--watchdog-s", "150"]
    run = subprocess.run(cmd, cwd=REPO, timeout=240, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "tp_nccl.json").read_text())
    assert report["ok"] and report["backend"] == "gloo" and report["world"] == 2
    check = report["tp_equals_single_gpu"]
    assert check["passed"] and check["rel_err_max"] <= check["tolerance_rel"]
    soak = report["soak"]
    assert soak["forward_logs_equal"] and soak["outputs_bitwise_equal"] and soak["forwards"] > 10
    assert soak["tower_collectives"] == 2 * report["shape"]["depth"] * soak["forwards"]
    assert all(slept > 0 for slept in soak["jitter_slept_s_per_rank"])
    failure = report["failure"]
    assert failure["paths_equal"] and failure["outputs_equal"] and failure["fallback_items"] == [3, 7]
    assert failure["paths_rank0"][10] == "on_demand" and failure["agreed_failures"] > 0
    for tp in ("tp1", "tp2"):
        assert report["throughput"][tp]["encoder_alone"]["patches_per_s"] > 0
    assert "rank0" in (tmp_path / "tp_nccl.log").read_text() and "rank1" in (tmp_path / "tp_nccl.log").read_text()
