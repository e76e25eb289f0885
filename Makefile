# Two set-up commands for a fresh machine: `make run` and `make test` (see README).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test test-second-capability lint check-kernels bench bench-cpu gpu-check report wheels learn \
        transformers-tests clean

install: $(STAMP)

# venv + torch (CPU wheel on our CPU machines; override TORCH=... elsewhere) + the package with its test extras
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m unispeech.run $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

test: $(STAMP) lint check-kernels
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory test-second-capability

# the kernel-accuracy tests again under another CPU capability than this machine's own (AVX2 on an
# AVX-512 machine, else none): eager's rounding changes with it, so a bound that holds by luck fails here
ACCURACY_TESTS := tests/test_tolerances.py tests/test_attention.py tests/test_attention_packed.py \
                  tests/test_pos_conv.py tests/test_first_conv_layer.py tests/test_feature_encoder.py \
                  tests/test_pretraining.py tests/test_batch_invariance.py
SECOND_CAPABILITY = $$($(PY) -c "import torch; print('avx2' if torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'default')")
test-second-capability: $(STAMP)
	ATEN_CPU_CAPABILITY=$(SECOND_CAPABILITY) $(PY) -m pytest -q -p no:cacheprovider $(ACCURACY_TESTS) \
	    -k "not aot and not compile and not every_gpu_tile_config"

# ruff (ruff.toml: pyflakes, pycodestyle, 120 columns)
lint: $(STAMP)
	$(PY) -m ruff check .

# the GPU machine's Triton (compile-only: the CPU torch wheel will do) for the performance model
TRITON_GPU       ?= triton==3.6.0
TRITON_GPU_VENV  ?= .venv-triton36
TRITON_GPU_STAMP := $(TRITON_GPU_VENV)/.installed
KERNEL_CACHE     ?= .cache/kernels
$(TRITON_GPU_STAMP):
	test -x $(TRITON_GPU_VENV)/bin/python || python3 -m venv $(TRITON_GPU_VENV)
	$(TRITON_GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_GPU_VENV)/bin/python -m pip install -q "$(TRITON_GPU)" "$(TORCH)" "numpy<2.4"
	touch $(TRITON_GPU_STAMP)

# no GPU needed: csrc/*.cu with nvcc and every Triton aot_specs() kernel for sm_80/sm_90; registers, spills, mma;
# then the static performance model (bench/results/perf_model.{json,md}) under this Triton and the GPU
# machine's (TRITON_GPU, in its own venv), its sm_90 builds reused from the checker's cache
check-kernels: $(STAMP) $(TRITON_GPU_STAMP)
	$(PY) -m unispeech_kernels.check_kernels --cache $(KERNEL_CACHE)
	$(PY) -m unispeech_kernels.perf_model --cache $(KERNEL_CACHE) --triton-python $(TRITON_GPU_VENV)/bin/python

# benchmarks (bench/results/README.md). GPU targets use the system python3 (BENCH_PY), never a venv.
BENCH_PY    ?= python3
# every bench/test_*.py: the profile (bench/cases.py) gives the cases and their order
BENCH_FILES := bench/
BENCH_OPTS  := -q -p no:cacheprovider --benchmark-columns=min,median,max,rounds --benchmark-sort=name
NEWEST      = $$(ls -t bench/results/*.json | head -1)

# every op and model case (BENCH_PROFILE=full), then the report of the new results file
bench:
	BENCH_PROFILE=$${BENCH_PROFILE:-full} $(BENCH_PY) -m pytest $(BENCH_OPTS) $(BENCH_FILES); s=$$?; \
	$(BENCH_PY) -m bench.report --summary $(NEWEST); exit $$s

# the CPU comparisons: UniSpeech-base, 2 x 10 s (one row 7 s), fp32, ours vs transformers; forced
# alignment of 64 utterances, batched vs a per-utterance numpy loop (and torchaudio)
bench-cpu: $(STAMP)
	BENCH_PROFILE=cpu $(PY) -m pytest $(BENCH_OPTS) bench/test_e2e.py bench/test_forced_align.py bench/test_wavlm.py; s=$$?; \
	$(PY) -m bench.report --summary $(NEWEST); exit $$s

# on a CUDA machine, no network: goal benchmarks, GPU tests, the other benchmarks, report (<= 9 min);
# `python -m bench.gpu_check --dry-run` runs its orchestration anywhere on estimated times
gpu-check:
	bash bench/gpu_check.sh

# markdown + PNG of RESULTS=bench/results/X.json (default: the newest file)
report:
	$(BENCH_PY) -m bench.report $(or $(RESULTS),$(NEWEST))

# wheels gpu-check installs when the GPU machine lacks them; carry .wheels/ there (it is git-ignored)
wheels:
	python3 -m pip download -q --no-deps -d .wheels pytest-benchmark py-cpuinfo

# proof that the recipes learn speech (not part of `make test`; ~30 min on 2 CPU cores): an espeak-ng
# corpus, pre-training, fine-tuning from it / from random weights / in transformers, 2 seeds;
# results into bench/results/learning/learning_<date>.{json,md,png}. LEARN_SIZE=gpu: the larger configuration
learn: $(STAMP)
	command -v espeak-ng >/dev/null || (apt-get update && apt-get install -y espeak-ng)
	$(PY) -m bench.learning.run --size $(or $(LEARN_SIZE),cpu)

# transformers' own model tests (kept outside this repo: TRANSFORMERS_TESTS is a folder holding their tests/,
# see bench/transformers_suite.py) with MODE=plain (transformers alone), patched (patch_model on every model
# they build) or triton (attn_implementation="triton"); per-test outcomes to JUNIT at the end and to LOG as
# they come; TESTS: a selection (@FILE: one test id a line, run in that order). Compare two runs with
# `python -m bench.transformers_suite diff plain.xml patched.xml`. Plain takes ~40 min on 2 CPU cores; the
# other modes run Triton's interpreter (seconds a forward) and take hours
MODE  ?= plain
JUNIT ?= $(TRANSFORMERS_TESTS)/junit-$(MODE).xml
LOG   ?= $(TRANSFORMERS_TESTS)/outcomes-$(MODE).jsonl
TESTS ?= tests/models/unispeech tests/models/unispeech_sat tests/models/wav2vec2 tests/models/hubert
transformers-tests: $(STAMP)
	test -d "$(TRANSFORMERS_TESTS)/tests/models" || (echo "TRANSFORMERS_TESTS=<dir with tests/models>"; exit 2)
	cd $(TRANSFORMERS_TESTS) && PYTHONPATH=$(CURDIR) OMP_NUM_THREADS=1 $(abspath $(PY)) -m pytest -q -p no:cacheprovider \
	    -p bench.transformers_suite --kernels-mode $(MODE) --kernels-log $(abspath $(LOG)) \
	    --junitxml=$(abspath $(JUNIT)) \
	    -W ignore::pytest.PytestUnknownMarkWarning $(TESTS)

clean:
	rm -rf $(VENV) $(TRITON_GPU_VENV) $(KERNEL_CACHE) build *.egg-info unispeech_kernels/_C*.so \
	    unispeech_kernels/_build_info.json
