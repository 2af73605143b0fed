"""GPU-test stand-in for ``sgl_kernel`` where the real package cannot be installed (the lent GPU machine).

The real sglang-kernel wheel is a few hundred MB of CUDA builds, far over what can be carried there,
and sglang 0.5.23 imports names from it and its submodules when its modules load (quantization
schemes, layers). The GPU tests drive the vision towers, streams and the plugin's service, not those
kernels: every name of this package and of any ``sgl_kernel.*`` submodule resolves to a function
that raises if it is ever called, so a test can never pass on a silent no-op.
``scripts/gpu-test.sh`` puts this directory on ``PYTHONPATH`` only when no real ``sgl_kernel`` imports.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__version__ = "0.0.0+gpu-test-stand-in"


class _Stub:
    """A name of the real package: calling it raises; attributes (``scalar_types.uint4b8``) are stubs too."""

    def __init__(self, qualified: str) -> None:
        self._qualified = qualified
        self.__name__ = qualified.rpartition(".")[2]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._qualified} is a GPU-test stand-in and was called")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self._qualified}.{name}")

    def __repr__(self) -> str:
        return f"<GPU-test stand-in {self._qualified}>"


def _stub(qualified: str) -> Any:
    return _Stub(qualified)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    return _stub(f"sgl_kernel.{name}")


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _stub(f"{self.__name__}.{name}")


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any ``sgl_kernel.x.y`` import gets a stand-in module (a package, so deeper imports work too)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("sgl_kernel."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


sys.meta_path.append(_SubmoduleFinder())
