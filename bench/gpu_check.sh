#!/usr/bin/env bash
# `make gpu-check`: validate everything on a fresh CUDA machine with torch preinstalled and no network.
# Steps: facts -> test deps (from .wheels/ when missing) -> build the CUDA extension -> GPU tests ->
# benchmarks at model shapes (profile "check", time-boxed) -> results JSON + markdown + PNG -> a short
# summary table, printed last. Whole run <= GPU_CHECK_BUDGET_S (default 840 s, under 15 minutes).
# Uses the system python3 (PYTHON=... to override), never a venv. Exit status: non-zero when the build,
# the GPU tests or one of OUR benchmarked implementations failed, or no results file was written
# (a failing baseline is a row in the table, not a failure of the check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-840}
START=$(date +%s)
MARK=$(mktemp)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
STEPS=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
step() {  # step NAME TIMEOUT_S CMD...: run, record "NAME: ok/FAILED (rc) in N s"
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    echo; echo "=== [$(elapsed) s] $name"
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    local word=ok; [ "$rc" -eq 0 ] || { word="FAILED (rc $rc)"; FAILED=1; }
    STEPS+=("$(printf '%-22s %s in %d s' "$name:" "$word" $(( $(date +%s) - t0 )))")
    return "$rc"
}

echo "=== gpu-check on $(hostname) at $(date -u +%FT%TZ), budget ${BUDGET} s"
nvidia-smi -L 2>/dev/null || echo "(nvidia-smi not found)"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: $PY sees no CUDA GPU (torch.cuda.is_available() is False); nothing to check"; exit 2
fi
$PY -c "import torch; print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0))"

# test dependencies: pytest-benchmark and py-cpuinfo from .wheels/ (see `make wheels`) when missing
if ! $PY -c "import pytest, pytest_benchmark, cpuinfo" 2>/dev/null; then
    if [ -d .wheels ]; then
        step "install test deps" 120 $PY -m pip install -q --no-deps --no-index --find-links .wheels \
            pytest-benchmark py-cpuinfo
    else
        echo "gpu-check: pytest-benchmark / py-cpuinfo missing and no .wheels/ here: run 'make wheels' on a" \
             "machine with network and carry .wheels/ along"; exit 2
    fi
fi

# the CUDA extension, for this GPU's architecture only (faster build)
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} MAX_JOBS=${MAX_JOBS:-$(nproc)} FORCE_CUDA=1 \
    step "build extension" 420 $PY -m pip install -q --no-deps --no-build-isolation -e .
if $PY -c "import unispeech_kernels.info" 2>/dev/null; then
    step "backend info" 60 $PY -m unispeech_kernels.info
fi

# pytest exits 5 when it collects no test: no GPU test yet is not a failure of the check
step "gpu tests" 300 bash -c "$PY -m pytest -q -p no:cacheprovider -m gpu tests; rc=\$?; [ \$rc -eq 5 ] && exit 0; exit \$rc"

# benchmarks: whatever time is left, minus a minute for the report; the suite skips the cases left
# once BENCH_BUDGET_S has passed (ordered so the op kernels come first, end-to-end last)
LEFT=$(( BUDGET - $(elapsed) - 60 ))
if [ "$LEFT" -lt 60 ]; then LEFT=60; fi
BENCH_PROFILE=${BENCH_PROFILE:-check} BENCH_BUDGET_S=$LEFT \
    step "benchmarks" $(( LEFT + 120 )) $PY -m pytest -q -p no:cacheprovider \
        --benchmark-columns=min,median,max,rounds --benchmark-sort=name \
        bench/test_attention.py bench/test_pos_conv.py bench/test_feature_encoder.py bench/test_e2e.py \
        bench/test_bench_pretraining.py

RESULT=$(find "${BENCH_RESULTS_DIR:-bench/results}" -maxdepth 1 -name '*.json' -newer "$MARK" 2>/dev/null | sort | tail -1)
rm -f "$MARK"
if [ -z "$RESULT" ]; then
    STEPS+=("results:               FAILED (no results file written)"); FAILED=1
    SUMMARY="(no results)"
else
    SUMMARY=$($PY -m bench.report --summary "$RESULT")
    STEPS+=("results:               $RESULT (+ .md, .png)")
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp "${RESULT%.json}".* "$OUT"/; fi
fi

echo; echo "=== gpu-check done in $(elapsed) s"
printf '%s\n' "${STEPS[@]}"
echo
echo "$SUMMARY"
exit "$FAILED"
