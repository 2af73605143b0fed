"""What the e2e tests send, shared by the Engine driver and the HTTP test, and how counters are read."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

HARNESS = Path(__file__).resolve().parent
SHIMS = HARNESS / "shims"
REPO = HARNESS.parents[2]
PLUGIN_CONFIG = "configs/qwen2_5_vl.yaml"  # the model config users are told to pass, unchanged
# The settings a user changes from it that act on SGLang's scheduler queues and tokenizer manager: media always
# encoded at arrival (the shipped file leaves a request nobody waits ahead of to its prefill), prefill deferral,
# preprocessing on a thread of its own, uint8 pixels (on by default too), torch's own thread count in the tokenizer
# manager (the shipped file sets one thread).
TUNED_OVERRIDES = {"early_encode_min_waiting": 0, "defer_prefill_ms": 20, "preprocess_thread": True,
                   "uint8_pixels": True, "tokenizer_torch_threads": None}
MAX_NEW_TOKENS = 8

# Engine settings for SGLang's CPU path (see shared e2e recipe): torch-native attention, fp32, no graphs.
ENGINE_ARGS: dict[str, object] = {
    "device": "cpu", "attention_backend": "torch_native", "sampling_backend": "pytorch", "dtype": "float32",
    "disable_cuda_graph": True, "max_total_tokens": 4096, "max_running_requests": 8, "chunked_prefill_size": -1,
    "mem_fraction_static": 0.05, "skip_server_warmup": True, "random_seed": 0, "enable_metrics": True,
    "log_level": "warning",
}


def e2e_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every process of a CPU SGLang run: CPU engine, offline, harness shims first on the path."""
    env = dict(os.environ if base is None else base)
    for key in ("MM_COALESCER", "MM_COALESCER_CONFIG", "MM_COALESCER_MODE", "MM_COALESCER_MAX_HELD_MB",
                "PROMETHEUS_MULTIPROC_DIR", "SGLANG_PLUGINS", "MM_COALESCER_NOTED"):
        env.pop(key, None)
    path = [str(SHIMS), str(REPO)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env.update({
        "SGLANG_USE_CPU_ENGINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(path), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    })
    return env


def prompt(images: int = 0, videos: int = 0, text: str = "Describe it.") -> str:
    media = ("<|vision_start|><|image_pad|><|vision_end|>" * images
             + "<|vision_start|><|video_pad|><|vision_end|>" * videos)
    return f"<|im_start|>user\n{media}{text}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Request:
    """One generate call: its media (names of harness images, or 'video'), text and phase."""

    name: str
    images: tuple[str, ...] = ()
    video: bool = False
    text: str = "Describe it."
    abort: bool = False
    phase: int = 1  # phase 1 runs concurrently; each later phase starts after the previous one finished
    sampling: dict[str, object] = field(default_factory=dict)

    def prompt(self) -> str:
        return prompt(len(self.images), int(self.video), self.text)


def requests(with_video: bool) -> list[Request]:
    """Concurrent requests (one with two images, one repeating an image, one aborted mid-decode), then a
    repeat of a finished request (its prompt prefix is cached), then a video if a decoder is installed."""
    out = [
        Request("one_image_a", ("a",)),
        Request("one_image_b", ("b",)),
        Request("two_images_cd", ("c", "d"), text="Compare them."),
        Request("same_image_a_concurrent", ("a",), text="Again, what is it?"),
        Request("aborted_e", ("e",), abort=True),
        Request("repeat_of_one_image_a", ("a",), phase=2),
    ]
    if with_video:
        out.append(Request("video", video=True, text="What happens?", phase=3))
    return out


def sampling_params(req: Request) -> dict[str, object]:
    if req.abort:  # long enough that it is still decoding when the abort arrives
        return {"temperature": 0.0, "max_new_tokens": 3000, "ignore_eos": True}
    return {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}


def counter(metrics: dict[str, float], key: str) -> float:
    return metrics.get(key, 0.0)


def taken_by_prefill(metrics: dict[str, float]) -> float:
    """Items prefills took from the coalescer (encoded at arrival, or on demand)."""
    return (counter(metrics, "mm_coalescer_prefill_items_total{source=early}")
            + counter(metrics, "mm_coalescer_prefill_items_total{source=on_demand}"))


def served_by_plugin(metrics: dict[str, float]) -> float:
    """Items the plugin served a prefill without falling back: from the coalescer, or encoded inline on an idle
    coalescer (``early_encode_min_waiting``)."""
    return taken_by_prefill(metrics) + counter(metrics, "mm_coalescer_prefill_items_total{source=inline}")


def distinct_media(with_video: bool) -> int:
    """Each distinct image once, plus the video: what some prefill must encode at least once."""
    images = {name for req in requests(with_video) for name in req.images}
    return len(images) + int(with_video)


def parse_metrics(text: str) -> dict[str, float]:
    """``mm_coalescer_*`` samples of a Prometheus exposition, keyed by name and labels (coalescer label dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("mm_coalescer_"):
                continue
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "coalescer")
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            out[key] = out.get(key, 0.0) + sample.value
    return out


def read_multiproc_metrics(directory: str) -> dict[str, float]:
    """What SGLang's ``/metrics`` would serve: every process's series from the Prometheus multiprocess dir."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return parse_metrics(generate_latest(registry).decode())


def log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)
