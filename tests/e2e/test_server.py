"""End to end over HTTP: ``python -m sglang.launch_server`` on 127.0.0.1 with the README's plugin flags.

The server runs with ``--enable-mm-coalescer --mm-coalescer-config configs/qwen2_5_vl.yaml
--enable-metrics`` (the file unchanged) plus SGLang's CPU settings, serves the same scenario as
test_engine.py (concurrent image requests, one aborted through ``/abort_request`` while streaming, a
repeat of a finished request, a video), and its greedy ids must equal the Engine's with the plugin off.
The plugin's counters are read from the server's own ``/metrics``. Port: a free one on 127.0.0.1; every
wait is bounded; the server's process group is killed at the end, pass or fail.

Test-harness shims (tests/e2e/harness/shims, first on PYTHONPATH; see test_engine.py): a stand-in
``sgl_kernel`` package for names imported at module load, and ``sitecustomize.py`` resolving a few
``torch.ops.sgl_kernel.*_cpu`` names bound at import and making ``Tensor.pin_memory`` a no-op without CUDA.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import log_tail
from .harness import media, scenario

pytestmark = pytest.mark.e2e

READY_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(model: Path, port: int) -> list[str]:
    args = scenario.ENGINE_ARGS
    return [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--device", str(args["device"]), "--attention-backend", str(args["attention_backend"]),
        "--sampling-backend", str(args["sampling_backend"]), "--dtype", str(args["dtype"]), "--disable-cuda-graph",
        "--max-total-tokens", str(args["max_total_tokens"]), "--max-running-requests",
        str(args["max_running_requests"]), "--chunked-prefill-size", str(args["chunked_prefill_size"]),
        "--mem-fraction-static", str(args["mem_fraction_static"]), "--skip-server-warmup", "--random-seed",
        str(args["random_seed"]), "--log-level", "warning", "--enable-metrics",
        # The plugin, exactly as the README's launch command enables it:
        "--enable-mm-coalescer", "--mm-coalescer-config", scenario.PLUGIN_CONFIG,
    ]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(_server_command(tiny_model, port), env=scenario.e2e_environment(),
                                cwd=scenario.REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"launch_server exited with code {proc.returncode}:\n{log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"launch_server not ready in {READY_TIMEOUT_S} s:\n{log_tail(log)}")
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        _stop(proc)


def _data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _send(url: str, req: scenario.Request, files: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"text": req.prompt(), "sampling_params": scenario.sampling_params(req), "rid": req.name}
    if req.images:
        body["image_data"] = [_data_url(files[name]) for name in req.images]
    if req.video:
        body["video_data"] = [files["video"]]
    if not req.abort:
        resp = requests.post(f"{url}/generate", json=body, timeout=REQUEST_TIMEOUT_S)
        resp.raise_for_status()
        out = resp.json()
        return {"output_ids": out["output_ids"], "finish": out["meta_info"]["finish_reason"]}
    chunks, finish = 0, None
    with requests.post(f"{url}/generate", json={**body, "stream": True}, stream=True,
                       timeout=REQUEST_TIMEOUT_S) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            chunks += 1
            finish = json.loads(line[5:])["meta_info"].get("finish_reason")
            if chunks == 2:  # prefilled and decoding: abort mid-way
                requests.post(f"{url}/abort_request", json={"rid": req.name}, timeout=30).raise_for_status()
    return {"chunks": chunks, "finish": finish}


@pytest.fixture(scope="module")
def served(server: str, media_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    files = media.write_images(media_dir)
    decoder = media.video_decoder()
    if decoder is not None:
        files["video"] = media.write_video(media_dir)
    reqs = scenario.requests(with_video=decoder is not None)
    results: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=len(reqs)) as pool:
        for phase in sorted({r.phase for r in reqs}):
            batch = [r for r in reqs if r.phase == phase]
            outs = list(pool.map(lambda r: _send(server, r, files), batch))
            results.update({r.name: out for r, out in zip(batch, outs, strict=True)})
    metrics = scenario.parse_metrics(requests.get(f"{server}/metrics", timeout=30).text)
    out = {"results": results, "metrics": metrics, "video_decoder": decoder}
    (tmp_path_factory.mktemp("served") / "served.json").write_text(json.dumps(out, indent=1, sort_keys=True))
    return out


def test_server_greedy_ids_equal_engine_without_plugin(served: dict[str, Any], engine_runs: dict[str, Any]) -> None:
    off = engine_runs["off"]["results"]
    for req in scenario.requests(with_video=served["video_decoder"] is not None):
        got = served["results"][req.name]
        if req.abort:
            assert got["finish"]["type"] == "abort", got
            continue
        assert got["output_ids"] == off[req.name]["output_ids"], req.name


def test_server_metrics_show_items_were_served_by_the_plugin(served: dict[str, Any]) -> None:
    """From the coalescer, or inline on an idle one when nobody waited ahead (the shipped config's
    ``early_encode_min_waiting: 1``; 0.5.16's tokenizer manager hands HTTP requests over one by one, so there
    every item can go inline); none fell back."""
    metrics = served["metrics"]
    assert metrics.get("mm_coalescer_prefill_items_total{source=fallback}", 0.0) == 0, metrics
    assert scenario.served_by_plugin(metrics) >= scenario.distinct_media(served["video_decoder"] is not None), metrics


def test_server_every_item_encoded_at_arrival_is_taken_by_a_prefill(served: dict[str, Any]) -> None:
    """No wasted encodes over HTTP either: the repeat's cached prefix and the concurrent shared image."""
    metrics = served["metrics"]
    assert metrics.get("mm_coalescer_units_total", 0.0) == scenario.taken_by_prefill(metrics), metrics
