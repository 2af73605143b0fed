"""What transformers' image-token check costs a request in SGLang's processors, transformers' own check against the one
``sglang.fast_mm_token_check`` installs (transformers 5.17's), on the CPU, one thread, as SGLang's tokenizer manager
runs it.

Per request of the seed workload's shape (six 480x480 JPEG images, ``benchmarks/pixel_handover.py``'s): the family's
SGLang processor (``process_mm_data_async``) with each check in turn, request by request; the check's own time and
the whole call's, medians, and the token ids of both compared. With transformers 5.17 or later the two checks are
the same code and the numbers only show the noise.

    python -m benchmarks.token_check --out benchmarks/results          # every family, 20 requests each
    python -m benchmarks.token_check --family qwen3_vl --requests 1 --out DIR   # smoke

Needs ``sglang`` and ``mm_scheduler_sglang`` importable, as the integration tests do.
"""

from __future__ import annotations

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
from benchmarks.pixel_handover import FAMILIES, IMAGES, SIDE, family_arguments, preprocess, seed_images

CHECKS = ("transformers", "installed")


def measure(model_dir: Path, requests: int) -> dict[str, Any]:
    import sglang_models
    from mm_scheduler_sglang import token_check
    from transformers import processing_utils

    mixin = processing_utils.ProcessorMixin
    checks = {"transformers": mixin.__dict__["_check_special_mm_tokens"],
              "installed": token_check.check_special_mm_tokens}
    samples: dict[str, dict[str, list[float]]] = {name: {"check": [], "request": []} for name in CHECKS}
    spent: list[float] = []
    same_ids = True
    try:
        with sglang_models.mm_processor(model_dir) as build:
            mm_processor = build()
            for seed in range(requests + 1):  # the first request of each check warms up and is not counted
                urls = seed_images(seed)
                ids = {}
                for name in (CHECKS if seed % 2 else CHECKS[::-1]):
                    check = checks[name]

                    def timed(self: Any, *args: Any, _check: Any = check, **kwargs: Any) -> None:
                        started = time.perf_counter()
                        try:
                            _check(self, *args, **kwargs)
                        finally:
                            spent.append(time.perf_counter() - started)

                    mixin._check_special_mm_tokens = timed
                    spent.clear()
                    out, elapsed = preprocess(mm_processor, urls)
                    ids[name] = torch.as_tensor(out.input_ids)
                    if seed:
                        samples[name]["check"].append(sum(spent) * 1e3)
                        samples[name]["request"].append(elapsed * 1e3)
                same_ids &= torch.equal(ids["transformers"], ids["installed"])
    finally:
        mixin._check_special_mm_tokens = checks["transformers"]
    rows = [{"check": name, "requests": requests, "check_ms": statistics.median(samples[name]["check"]),
             "request_ms": statistics.median(samples[name]["request"])} for name in CHECKS]
    return {"rows": rows, "same_input_ids": same_ids}


def main(argv: Sequence[str] | None = None) -> int:
    p = family_arguments(__doc__, "check")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be at least 1")
    torch.set_num_threads(1)  # as SGLang's tokenizer manager runs its processor
    import sglang
    import sglang_models
    import transformers

    results = {}
    for family in args.family or FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            log(f"{family}: {args.requests} requests of {IMAGES} {SIDE}x{SIDE} images a check")
            results[family] = measure(sglang_models.model_dir(Path(tmp), family), args.requests)
        print(f"{family}:")
        print(format_table(results[family]["rows"], [("check", "check", ""), ("check_ms", "check ms", ".2f"),
                                                     ("request_ms", "processor call ms", ".1f")]))
        print(f"same input_ids: {results[family]['same_input_ids']}")
    write_json(args.out / "token_check.json", {"families": results, "sglang": sglang.__version__,
                                               "transformers": transformers.__version__, "torch": torch.__version__,
                                               "threads": 1, "images_per_request": IMAGES, "image_side": SIDE})
    return 0 if all(result["same_input_ids"] for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
