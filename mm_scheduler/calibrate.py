"""Measure a tower's activation bytes per patch instead of trusting a formula.

Why: the budget divides by ``bytes_per_patch``, and formulas miss real buffers (vLLM's Gemma4
formula ``hidden_size * 2 * num_layers`` both overshot SigLIP 2.3x here and undershot a one_hot
buffer that OOM'd an L4). We run probe forwards of growing size, read the allocator's peak above
the pre-forward baseline, fit ``peak = intercept + slope * patches`` and answer the larger of the
slope and the per-patch peak of the largest probe (so the fixed part is covered at batch scale),
times ``1 + margin``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .types import EncodeItem, Tower


@dataclass(frozen=True)
class Calibration:
    """Probe results; ``bytes_per_patch`` is what the budget should use."""

    patches: tuple[int, ...]
    peak_bytes: tuple[int, ...]
    slope: float
    intercept: float
    margin: float
    bytes_per_patch: int


def measure_forward_peak(tower: Tower, units: Sequence[EncodeItem], device: torch.device) -> int:
    """Peak bytes allocated above the baseline during one forward (outputs included)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    outputs = tower.forward(units)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del outputs
    return peak


def calibrate(tower: Tower, make_units: Callable[[int], Sequence[EncodeItem]], patch_counts: Sequence[int],
              margin: float = 0.2, device: str | torch.device | None = None) -> Calibration:
    """Run probe forwards of ``make_units(n)`` for each ``n`` in ``patch_counts`` and fit the peaks."""
    device = torch.device(device if device is not None else getattr(tower, "device", "cuda"))
    if device.type != "cuda":
        raise ValueError(f"calibration reads CUDA allocator statistics; tower is on {device}")
    if len(patch_counts) < 2:
        raise ValueError("calibration needs at least two probe sizes to fit a slope")
    probes = [make_units(n) for n in patch_counts]
    sizes = [sum(u.num_patches for u in units) for units in probes]
    with torch.cuda.device(device), torch.inference_mode():
        measure_forward_peak(tower, probes[-1], device)  # warm-up: workspaces, kernels, allocator pools
        peaks = [measure_forward_peak(tower, units, device) for units in probes]
    mean_x = sum(sizes) / len(sizes)
    mean_y = sum(peaks) / len(peaks)
    var_x = sum((x - mean_x) ** 2 for x in sizes)
    if var_x == 0:
        raise ValueError(f"probe sizes must differ, got {sizes}")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(sizes, peaks, strict=True)) / var_x
    intercept = mean_y - slope * mean_x
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    per_patch = max(slope, peaks[largest] / sizes[largest])
    return Calibration(tuple(sizes), tuple(peaks), slope, intercept, margin, math.ceil(per_patch * (1.0 + margin)))


def calibrate_bytes_per_patch(tower: Tower, make_units: Callable[[int], Sequence[EncodeItem]],
                              patch_counts: Sequence[int], margin: float = 0.2) -> int:
    """Measured activation bytes per patch, with ``margin`` of headroom (see :func:`calibrate`)."""
    return calibrate(tower, make_units, patch_counts, margin).bytes_per_patch


def calibrate_tower(tower: Tower, margin: float = 0.2) -> int:
    """Calibrate a tower that knows its own probes (``probe_units(n)`` and ``probe_patch_counts``)."""
    make_units = getattr(tower, "probe_units", None)
    counts = getattr(tower, "probe_patch_counts", None)
    if make_units is None or counts is None:
        raise TypeError(f"{type(tower).__name__} has no probe_units/probe_patch_counts; "
                        "call calibrate_bytes_per_patch with your own probe maker")
    return calibrate_bytes_per_patch(tower, make_units, counts, margin)
