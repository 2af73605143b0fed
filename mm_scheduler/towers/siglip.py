"""SigLIP vision tower (transformers' ``SiglipVisionModel``) as a uniform-batch :class:`Tower`.

Units are ``[3, H, W]`` pixel tensors (a video frame unit is the same); ``num_patches`` is
``(H // patch) * (W // patch)``. With ``resolutions`` the tower serves several input sizes through
position-embedding interpolation: the coalescer then buckets units by patch count, and one forward
stacks only units of one size (a forward given mixed sizes runs one stacked pass per size).
Weights are random (no hub access is assumed); the numbers that matter here are shapes and speed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from ..types import EncodeItem
from ._staging import handed_off, resolve_device, stage

SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=384, patch_size=14)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=56, patch_size=14)


class SiglipTower:
    """SigLIP encoder; output per unit is the last hidden state ``[num_patches, hidden_size]``."""

    ragged = False

    def __init__(self, device: str | torch.device = "cuda", *, dtype: torch.dtype | None = None,
                 resolutions: Sequence[int] | None = None, tiny: bool = False, seed: int = 0) -> None:
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.device = resolve_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.config = SiglipVisionConfig(**(TINY if tiny else SO400M_384), vision_use_head=False)
        self.patch_size: int = self.config.patch_size
        self.resolutions = tuple(resolutions) if resolutions else (self.config.image_size,)
        self.interpolate = self.resolutions != (self.config.image_size,)
        torch.manual_seed(seed)
        with torch.device(self.device):
            model = SiglipVisionModel._from_config(self.config, attn_implementation="sdpa")
        self.model = model.to(self.dtype).eval().requires_grad_(False)
        # The Gemma4-style guess; calibrate.py replaces it with a measurement.
        self.bytes_per_patch = self.config.hidden_size * 2 * self.config.num_hidden_layers
        self.consumer_stream = torch.cuda.default_stream(self.device) if self.device.type == "cuda" else None
        self._pools: dict[int, list[torch.Tensor]] = {}

    def patches_for(self, resolution: int) -> int:
        """Patch count of a square ``resolution`` image."""
        return (resolution // self.patch_size) ** 2

    def validate(self, item: EncodeItem) -> None:
        """Reject what the model cannot encode, before it can poison a batch."""
        pv = item.pixel_values
        frame_dims = 4 if item.modality == "video" else 3
        if pv.dim() != frame_dims or pv.shape[-3] != self.config.num_channels:
            raise ValueError(f"SigLIP {item.modality} pixel_values must be "
                             f"{'[frames, ' if frame_dims == 4 else '['}{self.config.num_channels}, H, W], "
                             f"got {tuple(pv.shape)}")
        height, width = pv.shape[-2:]
        if not self.interpolate and (height, width) != (self.config.image_size,) * 2:
            raise ValueError(f"this SigLIP tower takes {self.config.image_size}x{self.config.image_size} "
                             f"pixels, got {height}x{width}")
        patches = (height // self.patch_size) * (width // self.patch_size)
        if patches != item.num_patches:
            raise ValueError(f"num_patches={item.num_patches} but {height}x{width} pixels make {patches} patches")

    def forward(self, units: Sequence[EncodeItem]) -> list[torch.Tensor]:
        """Stack units of each pixel shape into one bf16 pass; one ``[patches, hidden]`` tensor per unit."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, unit in enumerate(units):
            groups.setdefault(tuple(unit.pixel_values.shape), []).append(index)
        outputs: list[torch.Tensor] = [None] * len(units)  # type: ignore[list-item]
        for indices in groups.values():
            pixels = stage([units[i].pixel_values for i in indices], self.device, self.dtype)
            hidden = self.model(pixel_values=pixels, interpolate_pos_encoding=self.interpolate).last_hidden_state
            for index, output in zip(indices, handed_off(list(hidden), self.consumer_stream), strict=True):
                outputs[index] = output
        return outputs

    def make_pixels(self, resolution: int | None = None, *, pin: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Random ``[3, R, R]`` pixels in the tower's dtype (pinned on request) for tests and benchmarks."""
        size = resolution or self.config.image_size
        pixels = torch.randn(self.config.num_channels, size, size, generator=generator).to(self.dtype)
        return pixels.pin_memory() if pin else pixels

    def example_request(self, rng: random.Random) -> list[EncodeItem]:
        """A benchmark request: 1-4 images (60 % one), each of a random served resolution.

        Pixels come from a small cached pool (pinned on CUDA), so building thousands of requests
        ahead of a run costs neither host time nor memory; ``key`` stays None (no dedup)."""
        count = 1 if rng.random() < 0.6 else rng.randint(2, 4)
        items = []
        for _ in range(count):
            size = rng.choice(self.resolutions)
            items.append(EncodeItem(rng.choice(self._pool(size)), self.patches_for(size)))
        return items

    def _pool(self, size: int) -> list[torch.Tensor]:
        if size not in self._pools:
            gen = torch.Generator().manual_seed(size)
            self._pools[size] = [self.make_pixels(size, pin=self.device.type == "cuda", generator=gen)
                                 for _ in range(4)]
        return self._pools[size]

    def probe_units(self, patches: int) -> list[EncodeItem]:
        """About ``patches`` patches of native-size images, for bytes-per-patch calibration."""
        per_image = self.patches_for(self.config.image_size)
        pin = self.device.type == "cuda"
        return [EncodeItem(self.make_pixels(pin=pin), per_image) for _ in range(max(1, round(patches / per_image)))]

    @property
    def probe_patch_counts(self) -> list[int]:
        """Probe sizes (in patches) that calibration sweeps: 4 to 32 native images."""
        per_image = self.patches_for(self.config.image_size)
        return [per_image * n for n in (4, 8, 16, 32)]
