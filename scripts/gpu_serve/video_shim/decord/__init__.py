"""Stand-in for ``decord`` over OpenCV, for the harness's video request only.

SGLang 0.5.16 decodes videos with torchcodec, else decord (``sglang/srt/utils/video_decoder.py``); the GPU
machine has neither (no network, and decord's 13 MB wheel does not fit the carry beside the closure) but
has ``opencv-python-headless``. ``serve.py`` puts this directory on the servers' path only when neither
real decoder is importable, for the plugin-off and plugin-on servers alike. It implements exactly what
``VideoDecoderWrapper`` calls: ``VideoReader(path, ctx=cpu(0))``, ``len``, ``[i]``, ``get_avg_fps()`` and
``get_batch(indices).asnumpy()`` (frames NHWC uint8 RGB, as decord returns them).
"""

from __future__ import annotations

import numpy as np


def cpu(index: int = 0) -> str:
    return f"cpu:{index}"


def gpu(index: int = 0) -> str:
    raise RuntimeError("the decord stand-in decodes on the CPU only")


class _Batch:
    def __init__(self, frames: np.ndarray) -> None:
        self._frames = frames

    def asnumpy(self) -> np.ndarray:
        return self._frames


class VideoReader:
    """All frames decoded once at open (the harness's clips are a few dozen small frames)."""

    def __init__(self, path: str, ctx: str = "cpu:0", **_: object) -> None:
        import cv2

        capture = cv2.VideoCapture(path)
        if not capture.isOpened():
            raise RuntimeError(f"cannot open video {path!r}")
        self._fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        capture.release()
        if not frames:
            raise RuntimeError(f"no frames decoded from {path!r}")
        self._frames = np.stack(frames)

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> _Batch:
        return _Batch(self._frames[index])

    def get_avg_fps(self) -> float:
        return self._fps

    def get_batch(self, indices) -> _Batch:
        return _Batch(self._frames[np.asarray(list(indices), dtype=np.int64)])
