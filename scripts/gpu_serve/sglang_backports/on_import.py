"""Patch an SGLang module right after it is imported, in a server process whose PYTHONPATH holds this folder.

The folder's ``sitecustomize`` runs at every process's start-up, long before SGLang imports its model modules, and
installs the patches named in ``GPU_SERVE_PATCHES``; each registers the modules it changes here."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from typing import Any


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds a target module as the normal path finder does and runs its patch right after the module ran."""

    def __init__(self) -> None:
        self.targets: dict[str, list[Callable[[Any], None]]] = {}

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.targets:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run, patches = spec.loader.exec_module, self.targets[name]

        def exec_module(module: Any) -> None:
            run(module)
            for patch in patches:
                patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def on_import(module: str, patch: Callable[[Any], None]) -> None:
    """Run ``patch(module)`` once ``module`` is imported (in this process, from now on); a second call with the same
    patch changes nothing."""
    finder = next((f for f in sys.meta_path if isinstance(f, PatchOnImport)), None)
    if finder is None:
        finder = PatchOnImport()
        sys.meta_path.insert(0, finder)
    patches = finder.targets.setdefault(module, [])
    if patch not in patches:
        patches.append(patch)
