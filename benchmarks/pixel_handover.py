"""What an image request costs between SGLang's image processor and the scheduler, float32 against uint8 pixels
(``sglang.uint8_pixels``), on the CPU, with SGLang's own code at each step, for each family the setting covers
(Gemma 4 rescales; Gemma3, Qwen2.5-VL and Qwen3-VL also normalize, which the scheduler then redoes).

Per request of the seed workload's shape (six 480x480 JPEG images): the family's SGLang processor
(``process_mm_data_async``: load, HF processor, with the real model's processor settings) on the CPU; the hand-over
as SGLang makes it on one node (``ShmPointerMMData`` per item: a fresh ``/dev/shm`` segment and a copy, the handle
pickled; in the scheduler the handle unpickled and ``materialize()``: a clone out of the segment on 0.5.16, a
copy-on-write mapping on 0.5.23); and on the scheduler's side the plugin's ``Widening`` on the CPU (at arrival in a
scheduler without the plugin's service; the plugin's staging widens on the GPU, not measured here). Transports
alternate request by request; medians are reported, and the widened uint8 pixels are checked against the float32
ones bit for bit.

Not measured: the GPU-to-host copy of the processor's output on a GPU server (SGLang runs the fast processor on
the GPU there), which also shrinks 4x, and the GPU's own contention.

    python -m benchmarks.pixel_handover --out benchmarks/results                # every family, 20 requests each
    python -m benchmarks.pixel_handover --family qwen3_vl --requests 1 --out DIR  # smoke

Needs ``sglang`` and ``mm_scheduler_sglang`` importable, as the integration tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "integration"))  # sglang_models: real SGLang code

from benchmarks.harness import format_table, log, write_json

IMAGES = 6
SIDE = 480
TRANSPORTS = ("float32", "uint8")
FAMILIES = ("gemma4", "gemma3", "qwen2_5_vl", "qwen3_vl")


def seed_images(seed: int) -> list[str]:
    """The seed workload's six JPEG images, as data URLs, for ``seed``."""
    from PIL import Image

    urls = []
    for i in range(IMAGES):
        generator = torch.Generator().manual_seed(seed * IMAGES + i)
        pixels = torch.randint(0, 256, (SIDE, SIDE, 3), dtype=torch.uint8, generator=generator)
        buffer = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(buffer, format="JPEG")
        urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def preprocess(mm_processor: Any, urls: list[str]) -> tuple[Any, float]:
    """SGLang's ``process_mm_data_async`` of a request of ``urls``, and its seconds."""
    from sglang.srt.managers.io_struct import GenerateReqInput

    prompt = mm_processor.mm_tokens.image_token * len(urls) + "Describe."
    request = GenerateReqInput(text=prompt, image_data=urls, rid="bench")
    started = time.perf_counter()
    out = asyncio.run(mm_processor.process_mm_data_async(image_data=urls, input_text=prompt, request_obj=request))
    return out, time.perf_counter() - started


def _hand_over(features: list[torch.Tensor]) -> tuple[list[torch.Tensor], float, float]:
    """SGLang's one-node hand-over of each feature: ``ShmPointerMMData`` and its pickled handle in the tokenizer
    manager, then in the scheduler the unpickle and ``materialize()`` (0.5.16: a clone out of the segment; 0.5.23: a
    copy-on-write mapping), which unlinks the segment. Returns the features and each side's seconds."""
    from sglang.srt.managers.mm_utils import ShmPointerMMData

    started = time.perf_counter()
    handles = pickle.dumps([ShmPointerMMData(f) for f in features])
    sent = time.perf_counter()
    received = [pointer.materialize() for pointer in pickle.loads(handles)]
    return received, sent - started, time.perf_counter() - sent


def measure(model_dir: Path, requests: int) -> dict[str, Any]:
    import sglang_models
    from mm_scheduler_sglang import pixel_transport

    stages = ("preprocess", "handover_tm", "handover_scheduler", "widen")
    samples: dict[str, dict[str, list[float]]] = {t: {stage: [] for stage in stages} for t in TRANSPORTS}
    bytes_per_request: dict[str, int] = {}
    identical = True
    with sglang_models.mm_processor(model_dir) as build:
        processors = {"float32": build(), "uint8": build()}
        widening = pixel_transport.Widening.of(processors["float32"]._processor.image_processor)  # the scheduler's
        why_not = pixel_transport.narrow_images(processors["uint8"])
        if why_not is not None:
            raise SystemExit(f"uint8 pixels refused: {why_not}")
        for seed in range(requests + 1):  # the first request of each transport warms up and is not counted
            urls = seed_images(seed)
            features: dict[str, list[torch.Tensor]] = {}
            for transport in (TRANSPORTS if seed % 2 else TRANSPORTS[::-1]):
                out, preprocess_s = preprocess(processors[transport], urls)
                received, sent_s, received_s = _hand_over([item.feature for item in out.mm_items])
                started = time.perf_counter()
                features[transport] = [widening(tensor) for tensor in received]
                widen_s = time.perf_counter() - started
                bytes_per_request[transport] = sum(item.feature.nbytes for item in out.mm_items)
                if seed:
                    for stage, seconds in zip(stages, (preprocess_s, sent_s, received_s, widen_s), strict=True):
                        samples[transport][stage].append(seconds * 1e3)
            identical &= all(torch.equal(a, b) for a, b in zip(features["uint8"], features["float32"], strict=True))
    rows = [{"transport": t, "requests": requests, "bytes_per_request": bytes_per_request[t],
             **{f"{name}_ms": statistics.median(values) for name, values in samples[t].items()}}
            for t in TRANSPORTS]
    return {"rows": rows, "widened_equal_float32": identical}


def family_arguments(doc: str, measured: str) -> argparse.ArgumentParser:
    """The arguments of the CPU benchmarks of SGLang's processors: the families, requests per ``measured``, --out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=FAMILIES, action="append",
                   help="a family to measure (repeatable; default: all of them)")
    p.add_argument("--requests", type=int, default=20, help=f"measured requests a {measured} (after one warm-up)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = family_arguments(__doc__, "transport")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (SGLang's tokenizer workers use 1)")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be at least 1")
    torch.set_num_threads(args.threads)
    import sglang
    import sglang_models

    all_equal = True
    for family in args.family or FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            log(f"{family}: {args.requests} requests of {IMAGES} {SIDE}x{SIDE} images a transport, "
                f"{args.threads} thread(s)")
            result = measure(sglang_models.model_dir(Path(tmp), family), args.requests)
        result.update(family=family, sglang=sglang.__version__, torch=torch.__version__, threads=args.threads,
                      images_per_request=IMAGES, image_side=SIDE)
        print(f"{family}:")
        print(format_table(result["rows"], [("transport", "transport", ""),
                                            ("bytes_per_request", "bytes/request", ",d"),
                                            ("preprocess_ms", "preprocess ms", ".1f"),
                                            ("handover_tm_ms", "to /dev/shm ms", ".1f"),
                                            ("handover_scheduler_ms", "from /dev/shm ms", ".1f"),
                                            ("widen_ms", "widen (CPU) ms", ".1f")]))
        print(f"widened uint8 == float32 pixels: {result['widened_equal_float32']}")
        write_json(args.out / f"pixel_handover_{family}.json", result)
        all_equal &= result["widened_equal_float32"]
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
