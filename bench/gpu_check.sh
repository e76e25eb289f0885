#!/usr/bin/env bash
# `make gpu-check`: the whole GPU check in one command, on a CUDA machine with torch preinstalled and no
# network. bench/gpu_check.py says what it runs, in which order and under which caps; its knobs are
# environment variables (GPU_CHECK_BUDGET_S, GPU_CHECK_STEPS, BENCH_PROFILE, BENCH_SELECT,
# UNISPEECH_COMMIT). PYTHON: default the system python3, never a venv. `--dry-run`: the same
# orchestration on any machine, without a GPU, on estimated times.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
