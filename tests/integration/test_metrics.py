"""The coalescer's metrics reach SGLang's /metrics when --enable-metrics is on.

SGLang runs prometheus_client in multiprocess mode: with metrics enabled the launcher sets
``PROMETHEUS_MULTIPROC_DIR`` before spawning schedulers (``entrypoints/engine.py``
``_set_envs_and_config`` -> ``utils/common.py`` ``set_prometheus_multiproc_dir``), and the HTTP
server's ``/metrics`` aggregates that directory (``utils/common.py`` ``add_prometheus_middleware``).
Here a spawned "scheduler" process runs the plugin on a real SGLang model with that variable set,
and the test reads ``/metrics`` from a Starlette app wired by SGLang's own ``add_prometheus_middleware``.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os

import sglang_models as sm


def scheduler_process() -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from mm_scheduler_sglang import sglang_plugin

    model = sm.qwen2_5_vl()
    sglang_plugin.start(model, {"config_path": None, "mode": "async", "values": {"name": "qwen-test"}}, tp_size=1)
    model.get_image_feature([sm.qwen_image(model, 4, 4, 1), sm.qwen_image(model, 4, 8, 2)])
    sglang_plugin.stop()


def _get_metrics(app) -> str:
    """One GET /metrics through the ASGI interface (no HTTP client needed)."""
    scope = {"type": "http", "method": "GET", "path": "/metrics", "raw_path": b"/metrics", "root_path": "",
             "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http",
             "server": ("test", 80), "client": ("test", 1)}
    body: list[bytes] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    asyncio.run(app(scope, receive, send))
    return b"".join(body).decode()


def test_coalescer_metrics_from_a_scheduler_process_appear_on_sglang_metrics(tmp_path, monkeypatch):
    from sglang.srt.utils.common import add_prometheus_middleware
    from starlette.applications import Starlette

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    proc = mp.get_context("spawn").Process(target=scheduler_process)
    proc.start()
    proc.join(timeout=180)
    assert proc.exitcode == 0
    app = Starlette()
    add_prometheus_middleware(app)
    text = _get_metrics(app)
    assert 'mm_coalescer_units_total{coalescer="qwen-test"} 2.0' in text
    assert 'mm_coalescer_forwards_total{coalescer="qwen-test"}' in text
    assert 'mm_coalescer_prefill_items_total{coalescer="qwen-test",source="on_demand"} 2.0' in text
