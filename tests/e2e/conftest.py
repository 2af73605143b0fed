"""Fixtures of the end-to-end tests: a tiny random Qwen2.5-VL on disk, and Engine runs with the plugin off and on.

Every failure to build, start or serve fails the test (``pytest.fail`` with the log tail); nothing here
skips, so a CI machine that cannot run SGLang shows red, not a silent skip.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .harness import scenario
from .harness.tiny_qwen import build_checkpoint

ENGINE_TIMEOUT_S = 300


def log_tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else ["(no log)"]
    return "\n".join(line for line in text[-lines:] if "Ignore import error" not in line)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


def _run_engine(label: str, model: Path, media: Path, work: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    out, log = work / f"engine-{label}.json", work / f"engine-{label}.log"
    cmd = [sys.executable, str(scenario.HARNESS / "engine_run.py"), label, str(model), str(media), str(out)]
    with log.open("w") as sink:
        try:
            proc = subprocess.run(cmd, env=env or scenario.e2e_environment(), cwd=scenario.REPO, stdout=sink,
                                  stderr=subprocess.STDOUT, timeout=ENGINE_TIMEOUT_S, start_new_session=True)
        except subprocess.TimeoutExpired:
            pytest.fail(f"Engine (plugin {label}) did not finish in {ENGINE_TIMEOUT_S} s:\n{log_tail(log)}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"Engine (plugin {label}) failed with exit code {proc.returncode}:\n{log_tail(log)}")
    return {**json.loads(out.read_text()), "log": log.read_text(errors="replace")}


@pytest.fixture(scope="session")
def engine_runs(tiny_model: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenario served by a real sglang.Engine three times: plugin off, on (the shipped config), and on with
    the settings that act on SGLang's scheduler queues changed (``tuned``; one process each)."""
    work = tmp_path_factory.mktemp("engine")
    return {label: _run_engine(label, tiny_model, media_dir, work) for label in ("off", "on", "tuned")}


@pytest.fixture(scope="session")
def free_encoder_run(tiny_model: Path, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenario served plugin-off with the real-server harness's free encoder installed in every SGLang process,
    as serve.py installs it in an ``off+freeenc`` server: its patches folder first on the path, named in
    ``GPU_SERVE_PATCHES``."""
    patches = scenario.REPO / "scripts" / "gpu_serve" / "sglang_backports"
    env = scenario.e2e_environment()
    env["PYTHONPATH"] = f"{patches}:{env['PYTHONPATH']}"
    env["GPU_SERVE_PATCHES"] = "free_encoder"
    return _run_engine("freeenc", tiny_model, media_dir, tmp_path_factory.mktemp("engine-freeenc"), env)
