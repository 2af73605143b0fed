"""``benchmarks.cpu_lone_decode`` measures what it says: each side's Engine served the request, the plugin took the
image only where it was on, and every pair gives a decode ratio (its numbers are for the benchmark, not checked)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import scenario

pytestmark = pytest.mark.e2e


def test_cpu_lone_decode_runs_one_pair_with_the_plugin_taking_the_image_only_when_on(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.cpu_lone_decode", "--pairs", "1", "--tokens", "32", "--reps", "1",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=scenario.REPO, capture_output=True, text=True,
                          timeout=3 * 300 + 60)  # the checkpoint, then two Engines of at most 300 s each
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "cpu_lone_decode.json").read_text())
    off, on = report["runs"]
    assert (off["label"], on["label"]) == ("off", "on")
    assert off["plugin_items"] == 0 and on["plugin_items"] >= 1
    assert all(math.isfinite(run["first_token_ms"]) and math.isfinite(run["decode_ms_per_token"])
               for run in report["runs"])
    assert len(report["decode_ratio_on_off"]) == 1
