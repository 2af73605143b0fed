"""The harness's tests run on any machine: what fits the GPU is judged against an H200's memory (``serve.GPU_GIB``,
the machine the harness's servers were sized on), not against whatever ``nvidia-smi`` the test machine has."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve"))


@pytest.fixture(autouse=True)
def an_h200(monkeypatch):
    import serve

    monkeypatch.setattr(serve, "gpu_gib", lambda: serve.GPU_GIB)
