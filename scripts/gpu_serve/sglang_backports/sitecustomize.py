"""Runs at start-up in every Python process whose PYTHONPATH holds this folder (serve.py puts it only on a compared
server with patches: ``+backport``, ``+freeenc``): installs each module named in ``GPU_SERVE_PATCHES``
(``feature_device``, ``free_encoder``), then runs the ``sitecustomize`` it shadows."""

import importlib
import importlib.machinery
import importlib.util
import os
import sys

for _name in filter(None, os.environ.get("GPU_SERVE_PATCHES", "").split(",")):
    importlib.import_module(_name).install()

# The next sitecustomize on the path that is not a copy of this folder's (two copies would hand over to each other
# for ever).
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if not os.path.exists(os.path.join(p or os.curdir, "on_import.py"))])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
