"""Pieces the GPU benchmarks share: logging, Poisson arrivals, percentiles, tables, JSON, progress bars, towers.

Why one module: ``gpu_bench`` (encoder alone) and ``serving_bench`` (encoder inside a serving loop)
must draw arrivals, compute percentiles and build towers the same way, or their numbers do not compare.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def log(msg: str) -> None:
    """Timestamped progress line on stderr (stdout is kept for the result tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p99 is a latency that was observed)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def latency_stats(values: Sequence[float], prefix: str) -> dict[str, float]:
    """``{prefix}_p50_ms`` / p90 / p99 / mean of millisecond samples."""
    out = {f"{prefix}_p{q}_ms": pct(values, q) for q in (50, 90, 99)}
    out[f"{prefix}_mean_ms"] = statistics.fmean(values) if values else float("nan")
    return out


def poisson_trace(make: Callable[[random.Random], T], rate: float, duration: float,
                  seed: int) -> list[tuple[float, T]]:
    """``(arrival, make(rng))`` pairs from one seeded stream: the same seed gives the same trace."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append((t, make(rng)))


def stream_ctx(stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
    """Run on ``stream`` when there is one (CUDA), else do nothing (CPU smoke runs)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def resolve(device: str) -> torch.device:
    """A bare ``cuda`` becomes ``cuda:<current>`` (streams, events and threads need the index)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def build_bench_tower(name: str, device: torch.device, tiny: bool) -> Any:
    """One of the project's real towers (random weights); bf16 on CUDA, fp32 on CPU."""
    from mm_scheduler.towers import build_tower

    t = time.perf_counter()
    tower = build_tower(name, device, tiny=tiny)
    log(f"{name}: built in {time.perf_counter() - t:.1f}s")
    return tower


def bytes_per_patch(tower: Any, margin: float = 0.2) -> int:
    """Measured activation bytes per patch on CUDA (calibration probes); the tower's declared value on CPU."""
    if tower.device.type != "cuda":
        return int(tower.bytes_per_patch)
    from mm_scheduler.calibrate import calibrate_tower

    return calibrate_tower(tower, margin=margin)


# --- media --------------------------------------------------------------------------------------
class TowerWrapper:
    """A tower seen through a benchmark's wrapper: the coalescer's attributes, from the wrapped tower."""

    def __init__(self, tower: Any) -> None:
        self.inner = tower
        self.ragged = tower.ragged
        self.bytes_per_patch = tower.bytes_per_patch
        self.device = tower.device
        self.validate = tower.validate


@dataclass(frozen=True)
class Media:
    """One image or video of a request, as pixels in the tower's input layout."""

    modality: str  # "image" | "video"
    pixels: torch.Tensor  # qwen: [h*w, 1176] / [slices, h*w, 1176]; siglip: [3, R, R] / [frames, 3, R, R]
    patches: int  # per frame unit
    frames: int  # 1 for images
    tokens: int  # LLM tokens the item becomes
    meta: tuple[tuple[str, Any], ...] = ()


class MediaMix:
    """Requests' images of mixed resolutions and short videos over a fixed pool of pixel tensors.

    Mix (as ``gpu_bench``'s Qwen workload): 50 % one image, 30 % 2-3 images, 20 % one short video.
    Pixels come from a small pool (pinned on CUDA) so building thousands of requests costs nothing.
    """

    HEAVY_GRIDS = ((40, 40), (56, 56), (72, 72), (48, 80), (80, 48))
    """``heavy``: 560-1120 px images (400-1440 LLM tokens), 448 px clips: typical Qwen2.5-VL inputs under its
    default ``max_pixels`` (12.8 MP), where the vision tower is a large share of a request's prefill."""

    def __init__(self, tower_name: str, tower: Any, tiny: bool, seed: int = 0, heavy: bool = False) -> None:
        self.name = tower_name
        self.tower = tower
        pin = tower.device.type == "cuda"
        gen = torch.Generator().manual_seed(seed)
        self.images: list[list[Media]] = []
        self.videos: list[Media] = []
        if tower_name == "qwen2_5_vl":
            merge2 = tower.merge ** 2
            grids = [(8, 8), (8, 12)] if tiny else \
                list(self.HEAVY_GRIDS) if heavy else [(16, 16), (24, 24), (32, 32), (20, 36), (36, 20)]
            # 16 frames: 8 temporal slices, at 224 px (448 px heavy)
            (vh, vw), slices = ((4, 4), 3) if tiny else ((32, 32), 8) if heavy else ((16, 16), 8)
            for h, w in grids:
                self.images.append([Media("image", tower.make_pixels(h, w, pin=pin, generator=gen), h * w, 1,
                                          h * w // merge2, (("grid_hw", (h, w)),)) for _ in range(4)])
            self.videos = [Media("video", tower.make_pixels(vh, vw, slices, pin=pin, generator=gen), vh * vw,
                                 slices, slices * vh * vw // merge2, (("grid_hw", (vh, vw)),)) for _ in range(2)]
        else:  # siglip / siglip-mixed: one token per patch (LLaVA-style)
            for r in tower.resolutions:
                p = tower.patches_for(r)
                self.images.append([Media("image", tower.make_pixels(r, pin=pin, generator=gen), p, 1, p)
                                    for _ in range(4)])
            r, frames = min(tower.resolutions), 4
            p = tower.patches_for(r)
            for _ in range(2):
                clip = torch.stack([tower.make_pixels(r, generator=gen) for _ in range(frames)])
                self.videos.append(Media("video", clip.pin_memory() if pin else clip, p, frames, frames * p))

    def draw(self, rng: random.Random) -> list[Media]:
        u = rng.random()
        if u < 0.2:
            return [rng.choice(self.videos)]
        return [rng.choice(rng.choice(self.images)) for _ in range(1 if u < 0.7 else rng.randint(2, 3))]

    def warm_set(self) -> list[list[Media]]:
        """One request per image size and one video: every encoder shape used later, once."""
        return [[group[0]] for group in self.images] + [[self.videos[0]]]

    @property
    def max_tokens(self) -> int:
        return max(3 * max(g[0].tokens for g in self.images), max(v.tokens for v in self.videos))


# --- output -------------------------------------------------------------------------------------
def progress(iterable: Iterable[T], total: int, desc: str) -> Iterable[T]:
    """A tqdm bar on stderr when tqdm is installed (transformers depends on it), else the iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` are ``(key, header, format spec)``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([_cell(row.get(k), spec) for k, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(" ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(_cell(r.get(k), spec) for k, _, spec in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON; NaN becomes null so strict parsers read the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_no_nan(obj), indent=1))


def _no_nan(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_no_nan(v) for v in obj]
    return obj
