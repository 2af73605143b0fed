"""The two shapes every layer speaks: the unit of encode work, and the tower that encodes it."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

MODALITIES = ("image", "video")


@dataclass(eq=False, slots=True)
class EncodeItem:
    """One image, or one video, of a request.

    ``num_patches`` is what the budget counts. For ``modality="video"`` the first axis of
    ``pixel_values`` is the frame (or temporal-slice) axis and ``num_patches`` counts the patches of
    ONE frame unit: the coalescer encodes each frame as its own unit, so frames batch with images of
    the same size, and concatenates the per-frame outputs along dim 0.

    ``key`` names identical content (an image hash): equal keys queued or in flight at the same
    time are encoded once. ``meta`` is passed through untouched to the tower (e.g. a grid shape).

    ``ready``: for CUDA ``pixel_values``, an event recorded on the stream that produced them (a
    non-blocking copy, a CUDA-IPC rebuild). The encoder stream waits for it before reading, so it
    never reads pixels that have not landed. :meth:`Coalescer.encode` records one on the caller's
    current stream when it is None; callers on another thread than the coalescer's (the SGLang
    plugin) record it themselves, on their own stream, at submit.
    """

    pixel_values: torch.Tensor
    num_patches: int
    modality: str = "image"
    key: Hashable | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    ready: torch.cuda.Event | None = None


class Encoded(list):  # type: ignore[type-arg]
    """What :meth:`Coalescer.encode` returns: one tensor per item, in item order.

    ``events``: with ``handover: enqueued``, CUDA results are returned while the encoder stream may
    still be writing them; a consumer on another stream must make it wait for these events first
    (:meth:`wait`), and tie the tensors to its stream (``record_stream``) if it may drop them before
    that stream has read them. Empty with ``handover: complete``: the results are ready.
    """

    events: tuple[torch.cuda.Event, ...] = ()

    def wait(self, stream: torch.cuda.Stream | None = None) -> None:
        """Order ``stream`` (default: the current one) after the work that writes these results; no host wait."""
        if not self.events:
            return
        waiter = stream if stream is not None else torch.cuda.current_stream()
        for event in self.events:
            waiter.wait_event(event)


@runtime_checkable
class Tower(Protocol):
    """A vision encoder as the coalescer sees it.

    ``ragged``: one forward may mix patch counts (packed varlen towers such as Qwen2.5-VL); when
    False every forward holds a single patch count (SigLIP, Gemma).
    ``bytes_per_patch``: peak activation bytes per patch of a forward; the budget divides by it.
    ``forward`` is synchronous and runs on a worker thread (inside the executor's CUDA stream on
    GPU); it returns one output per unit, in order. A tower may also define
    ``validate(item) -> None`` raising ``ValueError`` for input it cannot encode: the coalescer calls
    it at submit time so a malformed item fails its own request instead of a whole batch.
    """

    ragged: bool
    bytes_per_patch: int

    def forward(self, units: Sequence[EncodeItem]) -> Sequence[torch.Tensor]: ...
