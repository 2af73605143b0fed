"""Runs at start-up in every Python process whose PYTHONPATH holds this folder (serve.py puts it only on the
``+backport`` plugin-off server's): installs ``feature_device``, then runs the ``sitecustomize`` it shadows."""

import importlib.machinery
import importlib.util
import os
import sys

import feature_device

feature_device.install()

_here = os.path.dirname(os.path.realpath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.realpath(p or os.curdir) != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
