"""Every async test of the core runs twice: on the standard asyncio loop and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

try:
    import uvloop
except ImportError:  # Windows: no uvloop, the standard loop only
    uvloop = None

CORE_TESTS = Path(__file__).parent / "core"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Callable] | None:
    if CORE_TESTS not in Path(str(item.path)).parents:
        return None
    factories: dict[str, Callable] = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories
