# Two commands a new user needs: `make bench` (the main job) and `make test` (the full suite).
# Each creates ./.venv on first use and installs what it needs; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: bench test lint clean gpu-bench serving-bench soak gpu-test mutate

# torch 2.14.1 + torchvision 0.29.1 are what sglang 0.5.23 pins; on these machines pip takes them from local disk.
$(VENV)/.core-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e .
	touch $@

# The real sglang package without its CUDA-only dependencies, plus a pinned list of light ones.
$(VENV)/.test-installed: $(VENV)/.core-installed requirements-test.txt requirements-sglang.txt requirements-e2e.txt
	$(PIP) --no-deps sglang==0.5.23 xgrammar==0.2.7
	$(PIP) -r requirements-test.txt
	touch $@

bench: $(VENV)/.core-installed
	mkdir -p bench-results
	$(VENV)/bin/mm-scheduler bench --json bench-results/cpu.json

test: $(VENV)/.test-installed
	bash scripts/run-tests.sh

# On a CUDA machine: real towers (SigLIP, SigLIP mixed-res, Qwen2.5-VL vision), about 5 minutes.
gpu-bench: $(VENV)/.test-installed
	$(PY) -m benchmarks.gpu_bench --all --no-cudnn-sdpa --out benchmarks/results
	$(PY) -m benchmarks.plot benchmarks/results/gpu_bench.json

# On a CUDA machine, with its system python3: every CUDA test (tests/gpu + tests marked gpu), CI skips them.
# Log with date and commit: benchmarks/results/gpu_tests.log. Carry ./.whl (scripts/fetch-gpu-wheels.sh) there.
gpu-test:
	GPU_TEST_PYTHON=$(PYTHON) bash scripts/gpu-test.sh

# On a CUDA machine: TTFT/ITL of an SGLang-shaped serving loop (Qwen2.5-VL-7B LM shape, real tower), about 5 minutes.
serving-bench: $(VENV)/.test-installed
	$(PY) -m benchmarks.serving_bench --out benchmarks/results

# A longer soak for people: 10,000 requests from 400 clients with cancels, poison, malformed outputs, OOM,
# slow forwards and one unbounded hang, on asyncio then uvloop; prints the figures, writes the JSON. Then the same
# through EncoderService from SGLang's scheduler-thread model (integration/soak_driver.py; needs sglang).
soak: $(VENV)/.test-installed
	$(PY) -m mm_scheduler.soak --requests 10000 --clients 400 --json benchmarks/results/soak.json
	$(PY) -m mm_scheduler.soak --requests 10000 --clients 400 --loop uvloop \
		--driver mm_scheduler_sglang.soak_driver:ServiceDriver --json benchmarks/results/soak_service.json

# Mutation testing (not part of `make test` or CI): mutmut applies one-line bugs to one module at a time and runs
# that module's test files (scripts/mutate.py maps them); a surviving mutant is a bug no test catches. Hours for
# everything on 2 cores: MUTATE_ARGS picks modules, e.g. `make mutate MUTATE_ARGS="service held --max-children 2"`.
# Results: build/mutate/summary.json, and `mutmut browse` in build/mutate/<module>.
MUTATE_ARGS ?=
mutate: $(VENV)/.test-installed
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) bench-results .pytest_cache
