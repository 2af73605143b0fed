"""``norm_lock``: SGLang's norm launchers take turns once the plugin runs a tower on its own thread.

The race it closes: a launcher sets a process-wide per-kernel limit to what its call needs, then launches; a
call from another thread that lowers the limit in between makes the launch fail (flashinfer's ``norm.cuh``
under sgl-kernel: ``RMSNorm failed with error code invalid argument``). ``RacyLauncher`` is that protocol in
Python; the CUDA version is ``tests/gpu/test_norm_lock_cuda.py``.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from mm_scheduler_sglang import norm_lock, sglang_compat


class RacyLauncher:
    """Sets the shared limit to the call's need, yields the GIL, launches: fails if the limit moved meanwhile."""

    def __init__(self) -> None:
        self.limit = 0
        self.failures = 0

    def __call__(self, need: int) -> int:
        self.limit = need
        time.sleep(0)  # another thread may run here, as between cudaFuncSetAttribute and cudaLaunchKernelEx
        if self.limit != need:
            self.failures += 1
        return need


def _hammer(launch, needs=(40, 12), calls=3000) -> None:
    def worker(need: int) -> None:
        for _ in range(calls):
            assert launch(need) == need

    threads = [threading.Thread(target=worker, args=(need,)) for need in needs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_two_threads_on_the_racy_launcher_fail_without_the_lock():
    launcher = RacyLauncher()
    _hammer(launcher)
    if launcher.failures == 0:
        pytest.skip("no interleaving happened: the control is inconclusive on this machine")


def test_with_the_lock_two_threads_never_see_the_other_calls_limit():
    launcher = RacyLauncher()
    module = SimpleNamespace(rmsnorm=launcher)
    assert norm_lock.serialize_norm_launches(module) == ["rmsnorm"]
    _hammer(module.rmsnorm)
    assert launcher.failures == 0


def test_every_launcher_present_is_wrapped_once_and_passes_arguments_and_results_through():
    seen = []

    def gemma_rmsnorm(x, weight, eps=1e-6, out=None):
        seen.append((x, weight, eps, out, norm_lock.LAUNCH_LOCK.locked()))
        return "normed"

    module = SimpleNamespace(rmsnorm=lambda x: x, gemma_rmsnorm=gemma_rmsnorm, layer_norm=lambda x: x)
    assert norm_lock.serialize_norm_launches(module) == ["rmsnorm", "gemma_rmsnorm"]
    assert norm_lock.serialize_norm_launches(module) == []  # a second plugin start wraps nothing twice
    assert module.gemma_rmsnorm(1, 2, eps=3.0) == "normed"
    assert seen == [(1, 2, 3.0, None, True)]  # held during the call
    assert not norm_lock.LAUNCH_LOCK.locked()
    assert module.gemma_rmsnorm.__name__ == "gemma_rmsnorm" and not hasattr(module.layer_norm, "takes_turns")


def test_sglangs_layernorm_module_is_the_default_and_each_launcher_it_has_takes_turns_after():
    import importlib

    layernorm = importlib.import_module(sglang_compat.LAYERNORM)
    norm_lock.serialize_norm_launches()
    for name in sglang_compat.NORM_KERNELS:  # absent on a CPU build (imported from sgl_kernel under CUDA only)
        launcher = getattr(layernorm, name, None)
        assert launcher is None or launcher.takes_turns
