"""GPU-test stand-in for ``sgl_kernel`` where the real package cannot be installed (the lent GPU machine).

The real sglang-kernel wheel is a few hundred MB of CUDA builds, far over what can be carried there,
and sglang 0.5.23 imports names from it when its modules load (quantization schemes, layers). The
GPU tests drive the vision towers, streams and the plugin's service, not those kernels: every name
resolves to a function that raises if it is ever called, so a test can never pass on a silent no-op.
``scripts/gpu-test.sh`` puts this directory on ``PYTHONPATH`` only when no real ``sgl_kernel`` imports.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def not_available(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"sgl_kernel.{name} is a GPU-test stand-in and was called")

    not_available.__name__ = name
    return not_available
