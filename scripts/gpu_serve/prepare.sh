#!/bin/bash
# Build what the GPU machine cannot download: the wheel closure of sglang 0.5.16 (WHEELS.txt, exact pins,
# cp312 manylinux) and sglang-kernel 0.4.5 stripped to its sm90 common ops (19 MB instead of 1.2 GB).
# Run on a machine that reaches the package index:   bash scripts/gpu_serve/prepare.sh [DEST]   (default .gpu-serve)
# Its packs (.gpu-serve-pack/sk.txz and whl.txz, beside DEST; PACK= moves them) travel to the GPU machine (device
# tool: carry .gpu-serve-pack), where serve.py unpacks them.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DEST=${1:-.gpu-serve}
mkdir -p "$DEST"; DEST=$(cd "$DEST" && pwd)
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
PLAT=""
for p in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  PLAT="$PLAT --platform ${p}_x86_64"
done
PIN=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT)

echo "[prepare] 1/4 wheels of WHEELS.txt"
PKGS=$(grep -v '^#' "$HERE/WHEELS.txt" | awk 'NF {print $1"=="$2}')
python3 -m pip download -q "${PIN[@]}" -d "$TMP/dl" $PKGS
rm -rf "$DEST/whl"; mkdir -p "$DEST/whl"
for w in "$TMP"/dl/*.whl; do
  case "$(basename "$w")" in   # drop what a Hopper server with triton attention never imports, keep RECORD consistent
    flashinfer_python-*) python3 "$HERE/repack.py" "$w" "$DEST/whl" --drop flashinfer/data/ ;;
    xgrammar-*) python3 "$HERE/repack.py" "$w" "$DEST/whl" --drop xgrammar/lib/ --drop xgrammar/include/ --strip ;;
    sglang-*) python3 "$HERE/repack.py" "$w" "$DEST/whl" --drop sglang/multimodal_gen/ --drop sglang/test/ \
                --drop sglang/srt/grpc/_core ;;
    *) cp "$w" "$DEST/whl/" ;;
  esac
done

echo "[prepare] 2/4 sglang-kernel 0.4.5 stripped to sm90/common_ops"
python3 -m pip download -q "${PIN[@]}" -d "$TMP/sk" sglang-kernel==0.4.5
rm -rf "$DEST/sk"; mkdir -p "$DEST/sk"
unzip -q "$TMP"/sk/sglang_kernel-0.4.5-*.whl -d "$DEST/sk" -x 'sgl_kernel/flash_ops.abi3.so' \
  'sgl_kernel/flashmla_ops.abi3.so' 'sgl_kernel/infllm_ops*' 'sgl_kernel/sm100/*'
python3 - "$DEST/sk/sgl_kernel/elementwise.py" <<'PY'
import sys
p = sys.argv[1]; s = open(p).read()
old = """try:
    import flashinfer.norm as _flashinfer_norm

    _has_flashinfer = True
except ImportError:
    _has_flashinfer = False"""
assert old in s, "sgl_kernel/elementwise.py changed: patch by hand"
open(p, "w").write(s.replace(old, "_has_flashinfer = False  # carried flashinfer has no JIT sources", 1))
PY

echo "[prepare] 3/4 sizes"
echo "$(ls "$DEST/whl" | wc -l) wheels, $(du -sh "$DEST/whl" | cut -f1); sk $(du -sh "$DEST/sk" | cut -f1); total $(du -sh "$DEST" | cut -f1)"

echo "[prepare] 4/4 packs for the device tool's carry (pack.py: ${PACK:=$(dirname "$DEST")/.gpu-serve-pack})"
python3 "$HERE/pack.py" "$DEST" "$PACK"
