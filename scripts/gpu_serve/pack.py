"""Pack what the GPU machine cannot download into ``.gpu-serve-pack/``, small enough for the device tool's carry.

Why: a command carries at most 64 MiB with the working tree (~16 MB). The 40 wheels (py-spy included) are 41.1 MB as
pip stores them, each file deflated on its own; re-stored uncompressed and put through one xz stream they take
20.8 MB (repeated Python text compresses across files). That room is what lets a command also carry the JIT cache
(a cold Gemma 4 command otherwise builds kernels in its warm-ups, ~100 s) and py-spy.

    python3 scripts/gpu_serve/pack.py [PREPARED] [PACK]     (defaults .gpu-serve and .gpu-serve-pack)

writes ``PACK/sk.txz`` (the stripped sglang-kernel folder ``sk/``) and ``PACK/whl.txz`` (``whl/*.whl``, stored).
``serve.py``'s ``install`` unpacks them next to the prepared folder. The wheels stay valid: RECORD hashes the files,
not their compression, and names, dates and modes are kept (pip installs the same tree from either).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

XZ_PRESET = 9 | lzma.PRESET_EXTREME


def stored(wheel: Path) -> bytes:
    """The wheel re-written with every member stored uncompressed, in the same order and with the same bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            copy.external_attr = info.external_attr
            zout.writestr(copy, zin.read(info.filename), compress_type=zipfile.ZIP_STORED)
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def pack_wheels(wheels: Path, dest: Path) -> Path:
    """``dest`` (``whl.txz``): every ``*.whl`` of ``wheels`` as ``whl/<name>``, stored, in one xz stream."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"no wheels in {wheels}: run scripts/gpu_serve/prepare.sh first")
    with lzma.open(dest, "wb", preset=XZ_PRESET) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        for wheel in found:
            _add(tar, f"whl/{wheel.name}", stored(wheel))
    return dest


def pack_kernel(sk: Path, dest: Path) -> Path:
    """``dest`` (``sk.txz``): the folder ``sk`` as ``sk/...``."""
    if not sk.is_dir():
        raise SystemExit(f"no {sk}: run scripts/gpu_serve/prepare.sh first")
    with lzma.open(dest, "wb", preset=XZ_PRESET) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        tar.add(sk, arcname="sk")
    return dest


def unpack(pack: Path, into: Path, folder: str) -> Path:
    """``into/folder`` replaced by the one the pack holds, whole or not at all (it is extracted beside it, then
    renamed into place); exits, naming the pack, when it holds none."""
    target = into / folder
    into.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=into))
    try:
        with tarfile.open(pack, "r:xz") as tar:
            members = [m for m in tar.getmembers() if m.name == folder or m.name.startswith(f"{folder}/")]
            if not members:
                raise SystemExit(f"{pack} holds no {folder}/ folder: rebuild it with scripts/gpu_serve/pack.py")
            tar.extractall(staging, members=members, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        (staging / folder).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def unpack_changed(pack: Path, into: Path, folder: str) -> Path:
    """``unpack``, unless ``into/folder`` already came from a pack with these bytes (``into/.<folder>-pack`` records
    its digest): a warm machine neither keeps a stale copy nor decompresses the same one again."""
    stamp, digest = into / f".{folder}-pack", hashlib.md5(pack.read_bytes()).hexdigest()
    if not ((into / folder).exists() and stamp.exists() and stamp.read_text() == digest):
        unpack(pack, into, folder)
        stamp.write_text(digest)
    return into / folder


def main() -> None:
    prepared = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu-serve")
    pack = Path(sys.argv[2] if len(sys.argv) > 2 else ".gpu-serve-pack")
    pack.mkdir(parents=True, exist_ok=True)
    for made in (pack_kernel(prepared / "sk", pack / "sk.txz"), pack_wheels(prepared / "whl", pack / "whl.txz")):
        print(f"[pack] {made}: {made.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
