"""One lock around SGLang's RMSNorm kernel launches, while the plugin runs a vision tower on a thread of its own.

flashinfer's norm launchers (compiled into sgl-kernel, ``norm.cuh``) set the kernel's
``cudaFuncAttributeMaxDynamicSharedMemorySize`` to the size this call needs and then launch. That attribute
is one value per kernel for the whole process. SGLang runs its towers on the scheduler thread, so the calls
never overlap; with the plugin, the tower's norms (Gemma 4's vision tower: widths 768 and 64, a few bytes of
shared memory) run on the coalescer's thread while the text model's (width 2,560: 40 bytes) run on the
scheduler thread. A call that lowers the limit between another call's set and launch makes that launch fail
with ``cudaErrorInvalidValue``, which killed a Gemma 4 E4B server twice in the real-server runs
(``RuntimeError: RMSNorm failed with error code invalid argument`` at the text model's
``post_attention_layernorm``; README, "Gemma 4 E4B"). The same race is known elsewhere (NVIDIA/cuvs#1771).

Holding one lock from set to launch makes the two threads take turns for a few microseconds a call; the
kernels still run concurrently on their streams, and results do not change (the same kernels, the same inputs).
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Callable
from typing import Any

from .sglang_compat import LAYERNORM, NORM_KERNELS

LAUNCH_LOCK = threading.Lock()


def serialize_norm_launches(module: Any = None) -> list[str]:
    """Wrap :data:`NORM_KERNELS` in ``module`` (default :data:`LAYERNORM`) so their launches take turns.

    Returns the names wrapped now: none where SGLang did not import them (no CUDA) or where it is done.
    """
    module = module if module is not None else importlib.import_module(LAYERNORM)
    wrapped = []
    for name in NORM_KERNELS:
        launcher = getattr(module, name, None)
        if launcher is None or getattr(launcher, "takes_turns", False):
            continue
        setattr(module, name, _taking_turns(launcher))
        wrapped.append(name)
    return wrapped


def _taking_turns(launcher: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(launcher)
    def taking_turns(*args: Any, **kwargs: Any) -> Any:
        with LAUNCH_LOCK:
            return launcher(*args, **kwargs)

    taking_turns.takes_turns = True  # type: ignore[attr-defined]
    return taking_turns
