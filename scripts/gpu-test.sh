#!/usr/bin/env bash
# `make gpu-test`: every CUDA test, on a CUDA machine, with the system python3 (CI has no GPU and skips them).
#   tests/gpu/ (all of it) + every test marked `gpu` elsewhere (core dedicated-stream tests, CUDA handoff, ...).
# The log, headed by the date, the commit and the machine, goes to benchmarks/results/gpu_tests.log (and to
# $OUT when set, where a lent machine returns files). Refresh it whenever code that touches CUDA changes.
#
# Wheels in ./.whl (scripts/fetch-gpu-wheels.sh) are installed first into /tmp/site: the real sglang and
# the light packages it imports, which that machine lacks. Without CUDA, or without an importable sglang,
# the run fails instead of letting the tests skip.
#
#   bash scripts/gpu-test.sh            # on the CUDA machine
#   GPU_TEST_SITE=/tmp/gpu-serve-site:.gpu-serve/sk bash scripts/gpu-test.sh   # against make gpu-serve's sglang
#   bash scripts/gpu-test.sh --smoke    # anywhere: checks the script and collects the tests, runs none
# The commit comes from git, else from $GPU_TEST_COMMIT (a copied tree without .git).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_TEST_PYTHON:-python3}
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
LOG=${GPU_TEST_LOG:-benchmarks/results/gpu_tests.log}
[ "$SMOKE" = 1 ] && LOG=${GPU_TEST_LOG:-/tmp/gpu_tests.smoke.log}
mkdir -p "$(dirname "$LOG")"
export PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1}

if [ -n "${GPU_TEST_SITE:-}" ]; then  # an sglang already installed there (e.g. make gpu-serve's 0.5.16 + sgl_kernel)
  export PYTHONPATH=$GPU_TEST_SITE${PYTHONPATH:+:$PYTHONPATH}
elif [ "$SMOKE" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then  # cp312 wheels: the CUDA machine only
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu-test: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The checkout itself, not installed there; the plugin folder under its installed name (mm_scheduler_sglang).
alias_dir=$(mktemp -d)
ln -s "$PWD/integration" "$alias_dir/mm_scheduler_sglang"
export PYTHONPATH=$PWD:$alias_dir${PYTHONPATH:+:$PYTHONPATH}
if [ "$SMOKE" = 0 ] && ! "$PY" -c "import sgl_kernel" 2> /dev/null; then  # see tests/gpu/shims/sgl_kernel
  export PYTHONPATH=$PWD/tests/gpu/shims:$PYTHONPATH
  echo "# sgl_kernel: not installed; using the raising stand-in in tests/gpu/shims"
fi

# A copied tree may carry a stale .git: GPU_TEST_COMMIT, when given, names the commit under test.
commit=${GPU_TEST_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo "unknown (no .git and no GPU_TEST_COMMIT)")}
dirty=$([ -z "${GPU_TEST_COMMIT:-}" ] && git status --porcelain --untracked-files=no 2>/dev/null | head -c1)
{
  echo "# make gpu-test  $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "# commit: $commit${dirty:+ (with uncommitted changes)}"
  "$PY" - <<'EOF'
import platform
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
try:
    import sglang
    sgl = sglang.__version__
except Exception as exc:  # reported here, enforced below
    sgl = f"not importable ({exc!r})"
print(f"# python {platform.python_version()}, torch {torch.__version__}, {gpu}, sglang {sgl}")
EOF
} 2>&1 | tee "$LOG"

if [ "$SMOKE" = 0 ]; then
  "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu-test: no CUDA device: refusing to run (the CUDA tests would all skip)")
# What the integration tests import; a missing module would turn them into skips or errors.
import sglang.srt.managers.mm_utils, sglang.srt.managers.schedule_batch, sglang.srt.plugins  # noqa: E401,F401
import sglang.srt.models.gemma3_mm, sglang.srt.models.gemma4_mm  # noqa: E401,F401
import sglang.srt.models.qwen2_5_vl, sglang.srt.models.qwen3_vl  # noqa: E401,F401
print("# preflight: CUDA and sglang importable")
EOF
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu-test: preflight failed (carry .whl: scripts/fetch-gpu-wheels.sh)" | tee -a "$LOG"; exit 2; }
fi

args=(-q -rs -p no:cacheprovider --continue-on-collection-errors)
[ "$SMOKE" = 1 ] && args+=(--collect-only)
"$PY" -c "import pytest_timeout" 2> /dev/null && args+=(--timeout=600)
echo "## tests/gpu" | tee -a "$LOG"
"$PY" -m pytest "${args[@]}" tests/gpu "$@" 2>&1 | tee -a "$LOG"
rc_gpu=${PIPESTATUS[0]}
echo "## tests marked gpu outside tests/gpu" | tee -a "$LOG"
"$PY" -m pytest "${args[@]}" -m gpu tests --ignore=tests/gpu "$@" 2>&1 | tee -a "$LOG"
rc_marked=${PIPESTATUS[0]}
echo "# exit codes: tests/gpu=$rc_gpu, marked gpu=$rc_marked" | tee -a "$LOG"
if [ -n "${OUT:-}" ] && [ -d "$OUT" ] && [ "$(realpath "$LOG")" != "$(realpath "$OUT")/$(basename "$LOG")" ]; then cp "$LOG" "$OUT/"; fi
[ "$rc_gpu" -eq 0 ] && [ "$rc_marked" -eq 0 ]
