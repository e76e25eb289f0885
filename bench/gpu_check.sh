#!/usr/bin/env bash
# `make gpu-check`: validate everything on a fresh CUDA machine with torch preinstalled and no network.
#
# Sized for how this project gets GPUs: one command may run 10 minutes and a session has about 15
# minutes of device time in all, the machine's start (a minute or two) included. So the whole check
# defaults to GPU_CHECK_BUDGET_S=540 s (one call with timeout_s=590), leaving a few minutes for a
# short second call, and spends it in this order, each step with its own cap:
#   1. facts (GPU, versions, commit) and the CUDA extension build started in the background (CPU only);
#   2. the kernel tests on CUDA -- every test file whose tensors live on the GPU (the Triton kernels
#      through the real compiler, transformers' models with attn_implementation="triton", our model
#      with the kernels) -- spread over CPU workers with pytest-xdist when it is there (Triton
#      compiles are CPU-bound);
#   3. the extension's own GPU tests, once its build has finished;
#   4. the benchmarks (profile "check": the goal shapes, ordered by priority; forced alignment
#      last: 64 utterances and a 30-minute file vs torchaudio, align() on 1 hour) with the time
#      that is left; cases past the budget become "skipped: time budget" rows;
#   5. results JSON (in $OUT when set) + markdown + PNG beside it, and a short summary table printed last.
# Every step's output also goes to gpu_check.log ($OUT/gpu_check.log when $OUT is set).
#
# Knobs: GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS (default "tests,cuda-tests,bench"; e.g. "bench" for a
# second call that only benchmarks), BENCH_PROFILE, BENCH_SELECT (a pytest -k expression for the
# benchmarks, e.g. "e2e"), UNISPEECH_COMMIT (the commit measured: the device gets the working tree
# without .git), PYTHON (default the system python3; never a venv).
# Exit status: non-zero when the build, a test or one of OUR benchmarked implementations failed (wrong
# results included), or no results file was written; a failing baseline is a row, not a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
STEPS_WANTED=${GPU_CHECK_STEPS:-tests,cuda-tests,bench}
LOGDIR=${OUT:-$(mktemp -d)}
mkdir -p "$LOGDIR"
exec > >(tee -a "$LOGDIR/gpu_check.log") 2>&1
START=$(date +%s)
MARK=$(mktemp)
TMPD=$(mktemp -d)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
STEPS=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
wanted() { [[ ",$STEPS_WANTED," == *",$1,"* ]]; }
left() { echo $(( BUDGET - $(elapsed) )); }
cap() { local n=$1; [ "$n" -gt "$(left)" ] && n=$(left); [ "$n" -lt 30 ] && n=30; echo "$n"; }
step() {  # step NAME TIMEOUT_S CMD...: run, record "NAME: ok/FAILED (rc) in N s"
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    echo; echo "=== [$(elapsed) s] $name (cap ${limit} s)"
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$? word=ok
    if [ "$rc" -eq 5 ] && [[ " $* " == *" pytest "* ]]; then rc=0; word="ok (no test collected)"; fi
    if [ "$rc" -ne 0 ]; then word="FAILED (rc $rc$([ "$rc" -eq 124 ] && echo ', timed out'))"; FAILED=1; fi
    STEPS+=("$(printf '%-22s %s in %d s' "$name:" "$word" $(( $(date +%s) - t0 )))")
    return "$rc"
}

echo "=== gpu-check on $(hostname) at $(date -u +%FT%TZ), budget ${BUDGET} s, steps ${STEPS_WANTED}"
nvidia-smi -L 2>/dev/null || echo "(nvidia-smi not found)"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: $PY sees no CUDA GPU (torch.cuda.is_available() is False); nothing to check"; exit 2
fi
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0), '| sm', '%d%d' % torch.cuda.get_device_capability())"
COMMIT=${UNISPEECH_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export UNISPEECH_COMMIT=$COMMIT
echo "commit: $COMMIT   cores: $(nproc)"
[ "$COMMIT" = unknown ] && echo "gpu-check: no .git here: set UNISPEECH_COMMIT=<sha> so the results name what they measured"
if ! "$PY" -c "import pytest, pytest_benchmark" 2>/dev/null; then
    if [ -d .wheels ]; then
        step "install test deps" 60 "$PY" -m pip install -q --no-deps --no-index --find-links .wheels \
            pytest-benchmark py-cpuinfo
    else
        echo "gpu-check: pytest / pytest-benchmark missing and no .wheels/ here: run 'make wheels' on a" \
             "machine with network and carry .wheels/ along"; exit 2
    fi
fi
XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$(( $(nproc) > 12 ? 12 : $(nproc) ))"); fi

# 1. the CUDA extension for this GPU's architecture only, in place (nothing installed), in the background
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
BUILD_T0=$(date +%s)
# CUDA_HOME: as given, else /usr/local/cuda when it exists, else torch finds nvcc on PATH
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
( export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} MAX_JOBS=${MAX_JOBS:-4} FORCE_CUDA=1
  timeout 300 "$PY" setup.py -q build_ext --inplace > "$LOGDIR/build.log" 2>&1; echo $? > "$TMPD/build.rc" ) &
BUILD_PID=$!

# 2. every test file with GPU tensors, on the GPU (the extension's tests wait for its build)
if wanted tests; then
    # --durations: the slowest tests (Triton compiles and autotuning included), to size this step's cap
    step "kernel tests on CUDA" "$(cap 150)" "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=10 \
        "${XDIST[@]}" tests/test_attention.py tests/test_attention_packed.py tests/test_pos_conv.py tests/test_feature_encoder.py \
        tests/test_first_conv_layer.py tests/test_transformers_attention.py tests/test_gpu_model.py tests/test_autotune_path.py \
        tests/test_op_registration.py tests/test_padding.py tests/test_forced_align.py tests/test_alignment.py
fi

# 3. the extension: build result, backend info, its GPU tests
wait "$BUILD_PID"
BUILD_RC=$(cat "$TMPD/build.rc" 2>/dev/null || echo 1)
if [ "$BUILD_RC" -eq 0 ] && ! ls unispeech_kernels/_C*.so > /dev/null 2>&1; then
    BUILD_RC=3; echo "setup.py built no extension: $(grep -m1 'not building' "$LOGDIR/build.log")"
fi
if [ "$BUILD_RC" -eq 0 ]; then
    STEPS+=("$(printf '%-22s ok in %d s (background)' 'build extension:' $(( $(date +%s) - BUILD_T0 )))")
else
    STEPS+=("build extension:       FAILED (rc $BUILD_RC): see build.log"); FAILED=1
    tail -30 "$LOGDIR/build.log"
fi
step "backend info" 60 "$PY" -m unispeech_kernels.info
if wanted cuda-tests && [ "$BUILD_RC" -eq 0 ]; then
    UNISPEECH_REQUIRE_CUDA_EXT=1 step "extension tests" "$(cap 90)" "$PY" -m pytest -q -p no:cacheprovider -rfE \
        tests/test_cuda_ext.py
fi

# 4. benchmarks with what is left, minus 60 s for the case in flight at the budget and the report.
# The results file is rewritten after every case, straight into $OUT when set (nothing lost if the
# command is killed from outside).
RESULTS_DIR=${BENCH_RESULTS_DIR:-${OUT:-bench/results}}
if wanted bench; then
    LEFT=$(( $(left) - 60 ))
    if [ "$LEFT" -lt 45 ]; then LEFT=45; fi
    SELECT=(); [ -n "${BENCH_SELECT:-}" ] && SELECT=(-k "$BENCH_SELECT")
    BENCH_PROFILE=${BENCH_PROFILE:-check} BENCH_BUDGET_S=$LEFT BENCH_RESULTS_DIR=$RESULTS_DIR \
        step "benchmarks" $(( LEFT + 40 )) "$PY" -m pytest -q -p no:cacheprovider \
            --benchmark-columns=min,median,max,rounds --benchmark-sort=name "${SELECT[@]}" \
            bench/test_attention.py bench/test_attention_packed.py bench/test_pos_conv.py \
            bench/test_first_conv_layer.py bench/test_feature_encoder.py bench/test_e2e.py \
            bench/test_bench_pretraining.py bench/test_forced_align.py
fi

# 5. results, report, summary
SUMMARY="(no benchmarks run)"
if wanted bench; then
    RESULT=$(find "$RESULTS_DIR" -maxdepth 1 -name '*.json' -newer "$MARK" 2>/dev/null | sort | tail -1)
    if [ -z "$RESULT" ]; then
        STEPS+=("results:               FAILED (no results file written)"); FAILED=1
        SUMMARY="(no results)"
    elif SUMMARY=$("$PY" -m bench.report --summary "$RESULT"); then
        STEPS+=("results:               $RESULT (+ .md, .png)")
    else
        STEPS+=("results:               $RESULT, but the report FAILED (see above)"); FAILED=1
        SUMMARY="(no summary: the report failed)"
    fi
fi
rm -rf "$MARK" "$TMPD"

echo; echo "=== gpu-check done in $(elapsed) s (commit $COMMIT)"
printf '%s\n' "${STEPS[@]}"
echo
echo "$SUMMARY"
exit "$FAILED"
