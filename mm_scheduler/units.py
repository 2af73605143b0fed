"""Submit-side rules shared by the asyncio Coalescer and the LockstepEncoder.

What makes an item valid, how a video becomes frame units, how per-unit outputs become per-item
results, and how the byte budget and bytes per patch are resolved: one definition, so both front
ends behave alike.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from .calibrate import calibrate_tower
from .config import CoalescerConfig
from .errors import CoalescerError, EncodeError, InvalidItemError
from .planner import Planner
from .types import MODALITIES, EncodeItem, Tower

logger = logging.getLogger(__name__)

Spans = list[tuple[int, int]] | None
"""Each item's range of units when a video was split; None when every item is one unit."""


def why_invalid(item: Any, planner: Planner, validate: Callable[[EncodeItem], None] | None) -> str | None:
    """Why ``item`` cannot be encoded, or None. ``validate`` is the tower's optional own check."""
    if not isinstance(item, EncodeItem):
        return f"expected EncodeItem, got {type(item).__name__}"
    pixels = item.pixel_values
    if not isinstance(pixels, torch.Tensor):
        return f"pixel_values must be a torch.Tensor, got {type(pixels).__name__}"
    if type(item.num_patches) is not int or item.num_patches <= 0:
        return f"num_patches must be a positive int, got {item.num_patches!r}"
    if item.modality == "video":
        frames = pixels.shape[0] if pixels.dim() >= 2 else 0
        if frames == 0:
            return f"video pixel_values must be [frames, ...] with at least one frame, got shape {tuple(pixels.shape)}"
        expected = item.meta.get("num_frames")
        if expected is not None and expected != frames:
            return f"video has {frames} frame units on axis 0 but meta['num_frames'] says {expected}"
    elif item.modality != "image":
        return f"unknown modality {item.modality!r}; expected one of {list(MODALITIES)}"
    elif pixels.numel() == 0:
        return "pixel_values is empty"
    if item.key is not None and not isinstance(item.key, Hashable):
        return f"key must be hashable, got {type(item.key).__name__}"
    too_big = planner.never_fits(item.num_patches)
    if too_big is not None:
        return f"can never be encoded: {too_big}"
    if validate is not None:
        try:
            validate(item)
        except ValueError as exc:
            return str(exc)
    return None


def check_items(items: Any, planner: Planner, validate: Callable[[EncodeItem], None] | None,
                on_invalid: Callable[[], None]) -> None:
    """Raise InvalidItemError naming the first bad item; ``on_invalid`` counts the rejection."""
    if isinstance(items, EncodeItem) or not isinstance(items, Sequence):
        on_invalid()
        raise InvalidItemError(f"encode() takes a sequence of EncodeItem, got {type(items).__name__}")
    for index, item in enumerate(items):
        reason = why_invalid(item, planner, validate)
        if reason is not None:
            on_invalid()
            raise InvalidItemError(f"item {index}: {reason}")


def split_into_units(items: Sequence[EncodeItem]) -> tuple[list[EncodeItem], Spans]:
    """Flatten videos into frame units (key ``(item_key, frame_index)``, the parent's meta)."""
    if all(item.modality == "image" for item in items):
        return list(items), None
    units: list[EncodeItem] = []
    spans: list[tuple[int, int]] = []
    for item in items:
        start = len(units)
        if item.modality == "video":
            units.extend(EncodeItem(frame, item.num_patches, "video",
                                    None if item.key is None else (item.key, i), item.meta, item.ready)
                         for i, frame in enumerate(item.pixel_values))
        else:
            units.append(item)
        spans.append((start, len(units)))
    return units, spans


def record_ready_events(items: Sequence[EncodeItem]) -> None:
    """Give CUDA inputs without a ``ready`` event one recorded on the current stream (the producer's)."""
    for item in items:
        pixels = item.pixel_values
        if item.ready is None and pixels.is_cuda:
            item.ready = torch.cuda.Event()
            item.ready.record(torch.cuda.current_stream(pixels.device))


def not_a_tensor(output: object) -> EncodeError | None:
    """The error for a tower output that is not a tensor (it fails that unit only), or None."""
    if isinstance(output, torch.Tensor):
        return None
    return EncodeError(f"tower returned a {type(output).__name__} for a unit, expected a torch.Tensor")


def unit_error(unit: EncodeItem, output: object) -> CoalescerError:
    """The error one waiter of a failed unit gets (a fresh instance each: waiters raise it separately)."""
    if isinstance(output, CoalescerError):  # ours already: a forward timeout, an unhealthy tower
        return type(output)(str(output))
    what = f"a {unit.modality} unit of {unit.num_patches} patches (key={unit.key!r})"
    if not isinstance(output, BaseException):
        return EncodeError(f"{not_a_tensor(output)} ({what})")
    error = EncodeError(f"tower failed on {what}: {output!r}")
    error.__cause__ = output
    return error


def assemble(outputs: list[torch.Tensor], spans: Spans) -> list[torch.Tensor]:
    """Per-unit outputs -> one result per item; a video's frames are concatenated along dim 0.

    Frames the tower returned with mismatched shapes, dtypes or devices cannot be joined: that is the
    tower's fault on this request's item, so it is an EncodeError (cause chained), not a raw
    RuntimeError/TypeError from ``torch.cat``.
    """
    if spans is None:
        return outputs
    results = []
    for index, (a, b) in enumerate(spans):
        if b - a == 1:
            results.append(outputs[a])
            continue
        try:
            results.append(torch.cat(outputs[a:b], dim=0))
        except (RuntimeError, TypeError, ValueError) as exc:
            shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in outputs[a:b]]
            raise EncodeError(f"item {index}: the tower's {b - a} frame outputs cannot be joined "
                              f"(shapes {shapes}): {exc}") from exc
    return results


def resolve_device(config: CoalescerConfig, tower: Tower) -> torch.device:
    """The configured device, else the tower's own, else CPU; a bare "cuda" becomes the current GPU."""
    device = torch.device(config.device or str(getattr(tower, "device", "cpu")))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_budget_bytes(config: CoalescerConfig, device: torch.device) -> int:
    """``budget_bytes``, or ``budget_fraction`` of the device's total memory (RAM on CPU).

    Total rather than free memory: identical GPUs then get identical budgets on every rank.
    """
    if config.budget_fraction is None:
        return int(config.budget_bytes)  # type: ignore[arg-type]
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total * config.budget_fraction)


def declared_bytes_per_patch(config: CoalescerConfig, tower: Tower) -> int:
    """The configured ``bytes_per_patch``, else the tower's declared one: never measured, so identical on
    every rank (what the LockstepEncoder needs for TP: a measured size could differ between ranks)."""
    choice = config.bytes_per_patch
    return choice if isinstance(choice, int) else int(tower.bytes_per_patch)


def resolve_bytes_per_patch(config: CoalescerConfig, tower: Tower, device: torch.device) -> int:
    """As :func:`declared_bytes_per_patch`, but "auto" on a CUDA tower measures it (see ``calibrate``):
    formulas miss real buffers, and the budget divides by this number."""
    if config.bytes_per_patch == "auto":
        if device.type == "cuda":
            return calibrate_tower(tower, margin=config.calibration_margin)
        logger.warning("bytes_per_patch: auto needs a CUDA tower; using the tower's declared value")
    return declared_bytes_per_patch(config, tower)
