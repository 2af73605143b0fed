"""sgl-kernel's RMSNorm from two threads at two widths: launches fail without ``norm_lock``, never with it.

Needs a real sgl_kernel (``make gpu-test`` with ``GPU_TEST_SITE`` at the serving harness's install); with the
raising stand-in of ``tests/gpu/shims`` it skips. The control phase (no lock) must fail at least once or the
test skips as inconclusive; the locked phase must not fail once.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from mm_scheduler_sglang import norm_lock

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
sgl_kernel = pytest.importorskip("sgl_kernel")
if "stand-in" in getattr(sgl_kernel, "__version__", "") or not hasattr(torch.ops.sgl_kernel, "rmsnorm"):
    pytest.skip("needs the real sgl_kernel (its rmsnorm op)", allow_module_level=True)


def _two_threads(rmsnorm, seconds: float = 15.0) -> tuple[int, list[str]]:
    """The text model's width (2,560) on one thread, Gemma 4 vision's (768, 64) on another, each on its stream."""
    stop, errors, calls = threading.Event(), [], []

    def worker(widths: list[int]) -> None:
        stream, done = torch.cuda.Stream(), 0
        inputs = [(torch.randn(8, w, device="cuda", dtype=torch.bfloat16),
                   torch.ones(w, device="cuda", dtype=torch.bfloat16)) for w in widths]
        with torch.cuda.stream(stream), torch.inference_mode():
            while not stop.is_set():
                for x, weight in inputs:
                    try:
                        rmsnorm(x, weight, 1e-6)
                    except RuntimeError as exc:
                        errors.append(str(exc))
                    done += 1
                    if done % 1024 == 0:
                        stream.synchronize()
        calls.append(done)

    threads = [threading.Thread(target=worker, args=(widths,)) for widths in ([2560], [768, 64])]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    return sum(calls), errors


def test_rmsnorm_from_two_threads_fails_without_the_lock_and_never_with_it():
    calls, errors = _two_threads(sgl_kernel.rmsnorm)
    if not errors:
        pytest.skip(f"control: {calls} unlocked calls, no failure: inconclusive on this machine")
    assert all("invalid argument" in e for e in errors), errors[:3]
    module = SimpleNamespace(rmsnorm=sgl_kernel.rmsnorm)
    norm_lock.serialize_norm_launches(module)
    calls, errors = _two_threads(module.rmsnorm)
    assert errors == [], f"{len(errors)} of {calls} locked calls failed: {errors[:3]}"
