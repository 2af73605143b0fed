"""The encoder-gaps benchmark runs end to end on tiny CPU towers (so it cannot rot), and its interval is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from benchmarks.encoder_gaps import median_ci

REPO = Path(__file__).parents[2]


def test_median_interval_brackets_the_median_with_order_statistics():
    values = list(range(300))
    med, lo, hi = median_ci(values)
    assert med == 149.5
    assert (lo, hi) == (133, 167)  # ranks n/2 -+ 1.96 * sqrt(n) / 2
    assert median_ci([5.0]) == (5.0, 5.0, 5.0)


def test_smoke_run_writes_every_section_and_skips_graphs_on_cpu(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.encoder_gaps", "--smoke", "--tower", "siglip", "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=REPO, check=True, timeout=240, capture_output=True, text=True)
    assert "skipped (CUDA graphs need a CUDA device" in run.stderr
    report = json.loads((tmp_path / "encoder_gaps_smoke.json").read_text())
    lone = report["lone"]["siglip"]
    assert lone["reps"] == 12 and lone["graphs"] is False
    assert set(lone["paths"]) == {"direct", "coalescer", "coalescer_hops"}
    for key in ("coalescer", "coalescer_hops"):
        path = lone["paths"][key]
        lo, hi = path["excess_ci95_ms"]
        assert lo <= path["excess_ms"] <= hi
        assert path["to_forward_ms"] >= 0 and path["after_forward_ms"] >= 0
    assert report["graph_vs_eager"].startswith("skipped")
    rows = report["mixed"]["rows"]
    assert {(r["load"], r["mode"]) for r in rows} == {(1.5, "coalescer"), (0.1, "per_item"), (0.1, "coalescer")}
    # Smoke windows are a fraction of a second on a busy CPU: requests may still be in flight when one
    # ends (timing is the GPU run's business); every row must have served some of its requests.
    assert all(0 <= r["unfinished"] < r["requests"] for r in rows)
    assert {"overload_ok", "light_ok", "light_p50_excess_eager_ms"} <= set(report["mixed"]["targets"])
    assert "== lone request" in run.stdout and "== siglip-mixed under load" in run.stdout
