"""Drive a real ``sglang.Engine`` on CPU, plugin off or on, and write what happened as JSON.

Run by tests/e2e/test_engine.py in a subprocess whose environment comes from
``scenario.e2e_environment()`` (SGLang's children are spawned and inherit it). The plugin is switched
on exactly as the README tells ``Engine`` users: ``MM_COALESCER=1`` and ``MM_COALESCER_CONFIG=<yaml>``.
Each Engine gets its own ``PROMETHEUS_MULTIPROC_DIR``; the plugin's series are read from it the way
SGLang's own ``/metrics`` reads them (prometheus_client's MultiProcessCollector).

One Engine per process: a second Engine with metrics in one process fails in SGLang itself
(``DuplicateTimeseries: sglang:startup_time_seconds``, its tokenizer manager lives in the launcher).

``tuned`` is the plugin with the shipped config plus ``scenario.TUNED_OVERRIDES`` (media always encoded at
arrival, prefill deferral, preprocessing on a thread of its own): the settings that act on SGLang's real
scheduler queues and tokenizer manager.

``freeenc`` is plugin off with the real-server harness's free encoder (scripts/gpu_serve/sglang_backports), which the
test's environment installs.

Usage: python engine_run.py off|on|tuned|freeenc MODEL_DIR MEDIA_DIR OUT_JSON
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import media
import scenario


async def _one(engine, req: scenario.Request, files: dict[str, str]) -> dict:
    kwargs: dict = {"prompt": req.prompt(), "sampling_params": scenario.sampling_params(req), "rid": req.name}
    if req.images:
        kwargs["image_data"] = [files[name] for name in req.images]
    if req.video:
        kwargs["video_data"] = [files["video"]]
    if not req.abort:
        out = await engine.async_generate(**kwargs)
        return {"output_ids": out["output_ids"], "finish": out["meta_info"]["finish_reason"]}
    chunks = 0
    finish = None
    async for chunk in await engine.async_generate(stream=True, **kwargs):
        chunks += 1
        finish = chunk["meta_info"].get("finish_reason")
        if chunks == 2:  # prefilled and decoding: abort mid-way
            engine.tokenizer_manager.abort_request(rid=req.name)
    return {"chunks": chunks, "finish": finish}


async def _scenario(engine, files: dict[str, str], with_video: bool) -> dict:
    results: dict[str, dict] = {}
    reqs = scenario.requests(with_video)
    for phase in sorted({r.phase for r in reqs}):
        batch = [r for r in reqs if r.phase == phase]
        outs = await asyncio.gather(*(_one(engine, r, files) for r in batch))
        results.update({r.name: out for r, out in zip(batch, outs, strict=True)})
    return results


async def _two_samples(engine, files: dict[str, str]) -> list[list[int]]:
    """``one_image_b`` again with n = 2: SGLang sends a warm-up and one request a sample, each with shallow copies
    of the request's items (``_handle_batch_request``), so each send must hand its own copy of the features over."""
    req = scenario.Request("one_image_b", ("b",))
    outs = await engine.async_generate(prompt=req.prompt(), image_data=[files["b"]],
                                       sampling_params={**scenario.sampling_params(req), "n": 2})
    return [out["output_ids"] for out in outs]


def _config(label: str) -> str:
    """The shipped config, or for ``tuned`` a copy of it with ``scenario.TUNED_OVERRIDES`` in its sglang section."""
    shipped = scenario.REPO / scenario.PLUGIN_CONFIG
    if label != "tuned":
        return str(shipped)
    import yaml

    config = yaml.safe_load(shipped.read_text())
    config["sglang"] = {**config.get("sglang", {}), **scenario.TUNED_OVERRIDES}
    path = Path(tempfile.mkdtemp(prefix="e2e-config-")) / "qwen2_5_vl_tuned.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def run_engine(model: str, files: dict[str, str], with_video: bool, label: str) -> dict:
    import sglang

    os.environ.pop("MM_COALESCER", None)
    os.environ.pop("MM_COALESCER_CONFIG", None)
    if label not in ("off", "freeenc"):  # exactly as the README tells Engine users
        os.environ["MM_COALESCER"] = "1"
        os.environ["MM_COALESCER_CONFIG"] = _config(label)
    metrics_dir = tempfile.mkdtemp(prefix="e2e-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    started = time.monotonic()
    startup_lines = _PluginLines()  # the Engine runs at log level warning: the plugin's start-up lines, kept here
    engine = sglang.Engine(model_path=model, **scenario.ENGINE_ARGS)
    try:
        ready = time.monotonic() - started
        results = engine.loop.run_until_complete(_scenario(engine, files, with_video))
        two_samples = engine.loop.run_until_complete(_two_samples(engine, files))
        metrics = scenario.read_multiproc_metrics(metrics_dir)
        preprocessing = {**_preprocessing(engine), "startup_lines": startup_lines.lines}
    finally:
        engine.shutdown()
    return {"results": results, "two_samples": two_samples, "metrics": metrics, "preprocessing": preprocessing,
            "start_s": ready, "total_s": time.monotonic() - started}


class _PluginLines(logging.Handler):
    """The plugin's INFO lines in this process (the launcher, where SGLang builds the tokenizer manager)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        plugin_logger = logging.getLogger("mm_scheduler_sglang.sglang_plugin")
        plugin_logger.setLevel(logging.INFO)
        plugin_logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _preprocessing(engine) -> dict:
    """Where this Engine's tokenizer manager (in this process) ran multimodal preprocessing."""
    import torch
    import transformers
    from mm_scheduler_sglang import preprocess, sglang_compat, token_check
    from transformers import processing_utils

    mm_processor = engine.tokenizer_manager.mm_processor
    return {**preprocess.stats(), "sglang_off_loop": sglang_compat.processor_runs_off_loop(mm_processor),
            "rescales": mm_processor._processor.image_processor.do_rescale,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "token_check_installed": processing_utils.ProcessorMixin._check_special_mm_tokens
            is token_check.check_special_mm_tokens}


def main() -> None:
    label, model, media_dir, out_path = sys.argv[1:5]
    files = media.write_images(Path(media_dir))
    decoder = media.video_decoder()
    if decoder is not None:
        files["video"] = media.write_video(Path(media_dir))
    scenario.log(f"engine with plugin {label}")
    report = run_engine(model, files, decoder is not None, label)
    report["video_decoder"] = decoder
    scenario.log(f"plugin {label}: {json.dumps(report['metrics'], sort_keys=True)}")
    Path(out_path).write_text(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
