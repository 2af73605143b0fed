"""Deterministic test media: seeded noise images (PNG) and, when a video decoder is installed, an MJPEG AVI.

The AVI is written by hand (RIFF container, JPEG frames from Pillow) because no video *encoder* is
installed; SGLang reads it with its own decoder (torchcodec, else decord).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# (name, width, height): different sizes give different patch counts (a ragged batch for the tower).
IMAGES = (("a", 224, 224), ("b", 168, 280), ("c", 280, 196), ("d", 112, 112), ("e", 196, 168))


def noise_image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish noise: a low-resolution grid upscaled, so JPEG/resize keep it recognisable.
    small = rng.integers(0, 256, size=(max(2, height // 14), max(2, width // 14), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def write_images(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, (name, width, height) in enumerate(IMAGES):
        path = folder / f"{name}.png"
        noise_image(100 + seed, width, height).save(path)
        paths[name] = str(path)
    return paths


def video_decoder() -> str | None:
    """The decoder SGLang's ``utils/video_decoder.py`` would pick, or None when neither is installed."""
    for name in ("torchcodec", "decord"):
        try:
            __import__(name)
        except Exception:  # torchcodec raises RuntimeError when FFmpeg libraries are missing
            continue
        return name
    return None


def _chunk(fourcc: bytes, data: bytes) -> bytes:
    pad = b"\0" if len(data) % 2 else b""
    return fourcc + struct.pack("<I", len(data)) + data + pad


def _list(kind: bytes, body: bytes) -> bytes:
    return _chunk(b"LIST", kind + body)


def write_mjpeg_avi(path: Path, frames: list[Image.Image], fps: int = 4) -> Path:
    """A minimal AVI 1.0 file with one MJPEG video stream and an idx1 index."""
    width, height = frames[0].size
    jpegs = []
    for frame in frames:
        buf = io.BytesIO()
        frame.convert("RGB").save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    n = len(jpegs)
    avih = struct.pack("<14I", 1_000_000 // fps, 0, 0, 0x10, n, 0, 1, max(map(len, jpegs)), width, height, 0, 0, 0, 0)
    strh = struct.pack("<4s4sIHHIIIIIIIIhhhh", b"vids", b"MJPG", 0, 0, 0, 0, 1, fps, 0, n,
                       max(map(len, jpegs)), 0xFFFFFFFF, 0, 0, 0, width, height)
    strf = struct.pack("<IiiHH4sIiiII", 40, width, height, 1, 24, b"MJPG", width * height * 3, 0, 0, 0, 0)
    hdrl = _list(b"hdrl", _chunk(b"avih", avih) + _list(b"strl", _chunk(b"strh", strh) + _chunk(b"strf", strf)))
    movi_body = b""
    index = b""
    for data in jpegs:
        offset = 4 + len(movi_body)  # relative to the 'movi' fourcc
        movi_body += _chunk(b"00dc", data)
        index += struct.pack("<4sIII", b"00dc", 0x10, offset, len(data))
    riff = b"AVI " + hdrl + _list(b"movi", movi_body) + _chunk(b"idx1", index)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(riff)) + riff)
    return path


def write_video(folder: Path, frames: int = 8, width: int = 112, height: int = 112) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    images = [noise_image(200 + i, width, height) for i in range(frames)]
    return str(write_mjpeg_avi(folder / "clip.avi", images))
