#!/usr/bin/env bash
# Download the wheels listed in scripts/gpu-wheels.txt into ./.whl (gitignored) for the CUDA machine:
# Python 3.12, manylinux x86_64, no dependencies (the list is the closed set). Then carry ".whl" with the
# GPU run; scripts/gpu-test.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v -E '^\s*(#|$)' scripts/gpu-wheels.txt | while read -r req; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$req"
done
du -ch .whl/*.whl | tail -1
