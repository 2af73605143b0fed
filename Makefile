# Two commands a new user needs: `make bench` (the main job) and `make test` (the full suite).
# `make bench` creates a light ./.venv-bench (CPU torch, no sglang); `make test` creates the full ./.venv
# (CUDA torch 2.14.1, sglang). Each is made on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
BENCH_VENV ?= .venv-bench
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
BENCH_PIP := $(BENCH_VENV)/bin/python -m pip install --quiet --disable-pip-version-check
MATPLOTLIB := matplotlib==3.11.2

.PHONY: bench test lint clean gpu-bench serving-bench soak gpu-test gpu-serve gpu-serve-prepare mutate \
	real-server-summary

# torch 2.14.1 + torchvision 0.29.1 are what sglang 0.5.23 pins; on these machines pip takes them from local disk.
$(VENV)/.core-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e .
	touch $@

# The real sglang package without its CUDA-only dependencies, plus a pinned list of light ones. sglang and
# xgrammar go LAST with --no-deps: pip then never checks their pins (CUDA-only packages, and releases such as
# tokenizers==0.23.2 where requirements-sglang.txt pins the newer one that works), so it prints no resolver
# ERROR lines. On a re-run they are taken out first, so installing the requirements never sees them either.
$(VENV)/.test-installed: $(VENV)/.core-installed requirements-test.txt requirements-sglang.txt requirements-e2e.txt
	$(PY) -m pip uninstall --quiet --yes sglang xgrammar 2>/dev/null || true
	$(PIP) -r requirements-test.txt
	$(PIP) --no-deps sglang==0.5.23 xgrammar==0.2.7
	touch $@

# The main job's own light venv: CPU torch 2.13.0 and the core's dependencies (requirements-bench.txt),
# matplotlib for the plot when the index has it, the project itself.
$(BENCH_VENV)/.installed: pyproject.toml requirements-bench.txt
	@echo "== $(BENCH_VENV): CPU torch 2.13.0 + the core's dependencies (no sglang, no CUDA)"
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PIP) --upgrade pip
	$(BENCH_PIP) -r requirements-bench.txt
	$(BENCH_PIP) $(MATPLOTLIB) || echo "matplotlib unavailable: the bench runs without its plot"
	$(BENCH_PIP) -e .
	touch $@

bench: $(BENCH_VENV)/.installed
	mkdir -p bench-results
	$(BENCH_VENV)/bin/mm-scheduler bench --json bench-results/cpu.json

# The plugin's tests also run against sglang 0.5.16, the oldest supported release, in a second venv: its own
# site-packages hold only what 0.5.16 pins differently (requirements-sglang0516.txt, --no-deps) and a .pth reads
# everything else from $(VENV) after them (torch 2.14.1 is reused, nothing is downloaded twice).
VENV_0516 ?= .venv-sglang0516
$(VENV_0516)/.installed: $(VENV)/.test-installed requirements-sglang0516.txt
	rm -rf $(VENV_0516)
	$(PYTHON) -m venv --without-pip $(VENV_0516)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
		> "$$($(VENV_0516)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/zz-mm-scheduler-venv.pth"
	$(VENV_0516)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-sglang0516.txt
	touch $@

test: $(VENV)/.test-installed $(VENV_0516)/.installed
	bash scripts/run-tests.sh

# On a CUDA machine: real towers (SigLIP, SigLIP mixed-res, Qwen2.5-VL vision), about 4 minutes (gpu_bench*.log).
gpu-bench: $(VENV)/.test-installed
	$(PY) -m benchmarks.gpu_bench --all --no-cudnn-sdpa --out benchmarks/results
	$(PY) -m benchmarks.plot benchmarks/results/gpu_bench.json

# On a CUDA machine, with its system python3: every CUDA test (tests/gpu + tests marked gpu), CI skips them.
# Log with date and commit: benchmarks/results/gpu_tests.log. Carry ./.whl (scripts/fetch-gpu-wheels.sh) there.
gpu-test:
	GPU_TEST_PYTHON=$(PYTHON) bash scripts/gpu-test.sh

# Not the serving benchmark (that is make gpu-serve, a real SGLang server): an SGLang-shaped loop kept for stream
# traces and the admission study. On a CUDA machine, about 4 minutes (234 s; serving_bench_meta.json).
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
	rm -rf $(VENV) $(VENV_0516) $(BENCH_VENV) bench-results .pytest_cache

# The serving benchmark: a real sglang.launch_server (0.5.16, dummy full-size weights) with the plugin off and
# on, driven by SGLang's own sglang.benchmark.serving. First, on a networked machine: make gpu-serve-prepare
# (the wheel closure and stripped sglang-kernel in .gpu-serve/, packed into .gpu-serve-pack/ for the trip). Then on the GPU machine, with its
# system python3: make gpu-serve FAMILY=qwen2_5_vl_7b (about 9 minutes a family; README, "Serving in a real
# SGLang server"). make real-server-summary turns the stored runs into benchmarks/results/real_server_summary.json.
# GPU_SERVE_ARGS passes serve.py options, e.g. GPU_SERVE_ARGS="--workloads seed,poisson --variants off,on,on+defer20".
FAMILY ?= qwen2_5_vl_7b
gpu-serve-prepare:
	bash scripts/gpu_serve/prepare.sh .gpu-serve

GPU_SERVE_ARGS ?=
gpu-serve:
	$(PYTHON) scripts/gpu_serve/serve.py --family $(FAMILY) --out gpu-serve-out $(GPU_SERVE_ARGS)

# Every stored harness run, oldest first per family (a family's runs accumulate: summarize.merge_runs); add a
# new run's directory here. Runs on an H100 (1a3705d's Qwen3-VL ones with a 100,000-token KV pool) merge too:
# each ratio in the summary says where it was measured (summarize.measured_on). The time breakdown reads the raw
# files of the run holding each family's seed0.
RS := benchmarks/results/real_server
REAL_SERVER_RUNS := $(RS)/results-qwen2_5_vl_7b.json $(RS)/qwen2_5_vl_7b-772e582/results-qwen2_5_vl_7b.json \
	$(RS)/attempt-82dd68a/results-qwen3_vl_8b.json $(RS)/qwen3_vl_8b-299e268/results-qwen3_vl_8b.json \
	$(RS)/results-gemma3_12b.json $(RS)/gemma3_12b-299e268/results-gemma3_12b.json \
	$(RS)/gemma3_12b-772e582/results-gemma3_12b.json $(RS)/gemma4_e4b-61058bd/results-gemma4_e4b.json \
	$(RS)/qwen2_5_vl_7b-3482823/results-qwen2_5_vl_7b.json $(RS)/qwen3_vl_8b-3482823/results-qwen3_vl_8b.json \
	$(RS)/gemma4_e4b-705d30c/results-gemma4_e4b.json $(RS)/qwen3_vl_8b-705d30c/results-qwen3_vl_8b.json \
	$(RS)/qwen2_5_vl_7b-1756d96/results-qwen2_5_vl_7b.json $(RS)/gemma3_12b-1756d96/results-gemma3_12b.json \
	$(RS)/qwen3_vl_8b-eea0358/results-qwen3_vl_8b.json $(RS)/qwen3_vl_8b-47877ef/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-43f5ffe/results-qwen3_vl_8b.json $(RS)/gemma4_e4b-43f5ffe/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-c704fd5/results-gemma4_e4b.json $(RS)/gemma4_e4b-e12f02a/results-gemma4_e4b.json \
	$(RS)/qwen3_vl_8b-e12f02a/results-qwen3_vl_8b.json $(RS)/qwen3_vl_8b-e12f02a-tok4ipc/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-e12f02a-tok4ipc-b/results-qwen3_vl_8b.json $(RS)/qwen3_vl_8b-643572e-fair/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-643572e-fair-poisson/results-qwen3_vl_8b.json $(RS)/qwen3_vl_8b-2279e05-enqueued/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-2279e05-enqueued-b/results-qwen3_vl_8b.json $(RS)/qwen2_5_vl_7b-2279e05/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-3f292ad-graphs-poisson/results-qwen2_5_vl_7b.json $(RS)/qwen3_vl_8b-3f292ad-enqueued-poisson/results-qwen3_vl_8b.json \
	$(RS)/gemma4_e4b-3f292ad-lazy-poisson/results-gemma4_e4b.json $(RS)/qwen2_5_vl_7b-3f292ad-graphs-poisson-b/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-a7ce4a5-lazy-poisson/results-qwen2_5_vl_7b.json $(RS)/gemma4_e4b-a7ce4a5-lazy-poisson/results-gemma4_e4b.json \
	$(RS)/qwen2_5_vl_7b-47b6b32-lazy-poisson/results-qwen2_5_vl_7b.json $(RS)/gemma4_e4b-5178309-g4graphs/results-gemma4_e4b.json \
	$(RS)/qwen2_5_vl_7b-5178309-default/results-qwen2_5_vl_7b.json $(RS)/gemma4_e4b-351b609-lookup/results-gemma4_e4b.json \
	$(RS)/gemma3_12b-351b609-g3graphs/results-gemma3_12b.json $(RS)/qwen2_5_vl_7b-351b609-default/results-qwen2_5_vl_7b.json \
	$(RS)/gemma4_e4b-e5bb1ae-correct/results-gemma4_e4b.json $(RS)/gemma4_e4b-e5bb1ae-g4graphs8/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-e5bb1ae-g4graphs8-80/results-gemma4_e4b.json $(RS)/gemma3_12b-e5bb1ae-shipped/results-gemma3_12b.json \
	$(RS)/gemma3_12b-2729c81-sleeping/results-gemma3_12b.json $(RS)/gemma4_e4b-2729c81-tok4ipc/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-2729c81-tok4ipc-poisson/results-gemma4_e4b.json $(RS)/gemma3_12b-86aa9fc-queue4m/results-gemma3_12b.json \
	$(RS)/gemma4_e4b-86aa9fc-tok4ipc/results-gemma4_e4b.json $(RS)/gemma4_e4b-9ca7bdd-floors/results-gemma4_e4b.json \
	$(RS)/gemma3_12b-9ca7bdd-floors/results-gemma3_12b.json $(RS)/gemma4_e4b-9ca7bdd-tok4ipc/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-e09d266-u8/results-gemma4_e4b.json $(RS)/gemma4_e4b-e09d266-u8-b/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-eb222d6-poisson/results-gemma4_e4b.json $(RS)/qwen3_vl_8b-e214c80-prethread/results-qwen3_vl_8b.json \
	$(RS)/gemma4_e4b-e214c80-prethread/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-717967f-prethread-poisson-h100/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-717967f-prethread-poisson-h100-b/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-1a3705d-poisson-h100/results-gemma4_e4b.json \
	$(RS)/qwen3_vl_8b-1a3705d-kv100k-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-1a3705d-kv100k-h100-prethread/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-1a3705d-kv100k-h100-b/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-1a3705d-kv100k-h100-twin/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-f4d38f4-graphs-small-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-f4d38f4-graphs-small-prethread-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-f4d38f4-prethread-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-f4d38f4-graphs-small-lazy1-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-db1d93c-default-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-db1d93c-noprethread-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-db1d93c-default-b-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen2_5_vl_7b-660b520-default-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-660b520-plainprethread-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-660b520-prethread-h100/results-qwen2_5_vl_7b.json \
	$(RS)/gemma3_12b-660b520-default-h100/results-gemma3_12b.json \
	$(RS)/qwen2_5_vl_7b-c5d3ab6-profile-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-c5d3ab6-freeenc-h100/results-qwen2_5_vl_7b.json \
	$(RS)/gemma3_12b-c5d3ab6-mmsdpa-h100/results-gemma3_12b.json \
	$(RS)/qwen2_5_vl_7b-e534b6b-tmthreads1-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-e534b6b-poisson-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-e84345c-tmthreads1-off-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-a22131f-tmthreads-poisson-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-a22131f-poisson-b-h100/results-qwen2_5_vl_7b.json \
	$(RS)/gemma4_e4b-a22131f-tmthreads1-h100/results-gemma4_e4b.json \
	$(RS)/gemma3_12b-a22131f-tmthreads1-h100/results-gemma3_12b.json \
	$(RS)/qwen3_vl_8b-fabe2d2-tmthreads1-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen3_vl_8b-fabe2d2-tmthreads1-poisson-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen2_5_vl_7b-fabe2d2-poisson-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen3_vl_8b-fabe2d2-poisson-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen2_5_vl_7b-fabe2d2-poisson80-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen3_vl_8b-fabe2d2-tmthreads1-poisson80-h100/results-qwen3_vl_8b.json \
	$(RS)/gemma4_e4b-fabe2d2-queue4m-h100/results-gemma4_e4b.json \
	$(RS)/qwen2_5_vl_7b-98072d3-profile80-h100/results-qwen2_5_vl_7b.json \
	$(RS)/gemma3_12b-98072d3-poisson50-h100/results-gemma3_12b.json \
	$(RS)/gemma3_12b-fe05901-mmsdpa-h100/results-gemma3_12b.json \
	$(RS)/gemma4_e4b-e23d815-queue4m-h100/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-e23d815-queue4m-h100-b/results-gemma4_e4b.json \
	$(RS)/gemma4_e4b-e23d815-queue4m-poisson80-h100/results-gemma4_e4b.json \
	$(RS)/qwen2_5_vl_7b-e23d815-poisson80-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-e23d815-poisson80-h100-b/results-qwen2_5_vl_7b.json \
	$(RS)/qwen2_5_vl_7b-e23d815-poisson-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen3_vl_8b-e23d815-poisson-h100/results-qwen3_vl_8b.json \
	$(RS)/qwen2_5_vl_7b-974577e-seed-h100/results-qwen2_5_vl_7b.json \
	$(RS)/qwen3_vl_8b-974577e-seed-h100/results-qwen3_vl_8b.json \
	$(RS)/gemma4_e4b-974577e-h100/results-gemma4_e4b.json \
	$(RS)/gemma3_12b-974577e-mmsdpa-h100/results-gemma3_12b.json \
	$(RS)/gemma3_12b-974577e-mmsdpa-freeenc-h100/results-gemma3_12b.json \
	$(RS)/qwen2_5_vl_7b-974577e-lone-poisson50-h100/results-qwen2_5_vl_7b.json
REAL_SERVER_RAW := qwen2_5_vl_7b=$(RS)/gpu-serve-qwen2_5_vl_7b.tar.xz qwen3_vl_8b=$(RS)/qwen3_vl_8b-299e268/gpu-serve-qwen3_vl_8b.tar.xz \
	gemma3_12b=$(RS)/gemma3_12b-299e268/gpu-serve-gemma3_12b.tar.xz gemma4_e4b=$(RS)/gemma4_e4b-61058bd/gpu-serve-gemma4_e4b.tar.xz
# A seed run whose first-token timeline the summary reports (summarize.first_token_timeline): family=archive@tag.
# Tags are unique: each archive is unpacked under its tag.
REAL_SERVER_TIMELINE := qwen3_vl_8b=$(RS)/qwen3_vl_8b-43f5ffe/gpu-serve-qwen3_vl_8b.tar.xz@seed10 \
	gemma4_e4b=$(RS)/gemma4_e4b-43f5ffe/gpu-serve-gemma4_e4b.tar.xz@seed3 \
	qwen3_vl_8b=$(RS)/qwen3_vl_8b-643572e-fair/gpu-serve-qwen3_vl_8b.tar.xz@seed15 \
	gemma4_e4b=$(RS)/gemma4_e4b-351b609-lookup/gpu-serve-gemma4_e4b.tar.xz@seed9 \
	gemma4_e4b=$(RS)/gemma4_e4b-e5bb1ae-g4graphs8/gpu-serve-gemma4_e4b.tar.xz@seed10 \
	gemma3_12b=$(RS)/gemma3_12b-e5bb1ae-shipped/gpu-serve-gemma3_12b.tar.xz@seed3 \
	gemma3_12b=$(RS)/gemma3_12b-2729c81-sleeping/gpu-serve-gemma3_12b.tar.xz@seed4 \
	gemma4_e4b=$(RS)/gemma4_e4b-2729c81-tok4ipc/gpu-serve-gemma4_e4b.tar.xz@seed12 \
	qwen3_vl_8b=$(RS)/qwen3_vl_8b-e214c80-prethread/gpu-serve-qwen3_vl_8b.tar.xz@seed21 \
	gemma4_e4b=$(RS)/gemma4_e4b-e214c80-prethread/gpu-serve-gemma4_e4b.tar.xz@seed21 \
	qwen2_5_vl_7b=$(RS)/qwen2_5_vl_7b-c5d3ab6-profile-h100/gpu-serve-qwen2_5_vl_7b.tar.xz@seed11 \
	qwen2_5_vl_7b=$(RS)/qwen2_5_vl_7b-e534b6b-tmthreads1-h100/gpu-serve-qwen2_5_vl_7b.tar.xz@seed13 \
	qwen2_5_vl_7b=$(RS)/qwen2_5_vl_7b-e534b6b-tmthreads1-h100/gpu-serve-qwen2_5_vl_7b.tar.xz@seed14 \
	qwen2_5_vl_7b=$(RS)/qwen2_5_vl_7b-e84345c-tmthreads1-off-h100/gpu-serve-qwen2_5_vl_7b.tar.xz@seed16 \
	qwen2_5_vl_7b=$(RS)/qwen2_5_vl_7b-e84345c-tmthreads1-off-h100/gpu-serve-qwen2_5_vl_7b.tar.xz@seed17 \
	gemma4_e4b=$(RS)/gemma4_e4b-a22131f-tmthreads1-h100/gpu-serve-gemma4_e4b.tar.xz@seed25 \
	gemma3_12b=$(RS)/gemma3_12b-a22131f-tmthreads1-h100/gpu-serve-gemma3_12b.tar.xz@seed9
# A run with a lone request on both servers, for the encoder's share of a lone request's TTFT: family=archive.
REAL_SERVER_LONE := qwen2_5_vl_7b=$(RS)/qwen2_5_vl_7b-47b6b32-lazy-poisson/gpu-serve-qwen2_5_vl_7b.tar.xz \
	qwen3_vl_8b=$(RS)/qwen3_vl_8b-43f5ffe/gpu-serve-qwen3_vl_8b.tar.xz \
	gemma4_e4b=$(RS)/gemma4_e4b-351b609-lookup/gpu-serve-gemma4_e4b.tar.xz \
	gemma3_12b=$(RS)/gemma3_12b-660b520-default-h100/gpu-serve-gemma3_12b.tar.xz
# Poisson runs whose encoder wait the summary reports (summarize.poisson_encoder_wait): family=archive, one a family and
# flag set; a run whose plugin servers ran extra SGLang flags beside a plugin-off server on the same ones (Gemma3 on
# sdpa) goes under that family's shipped_config_with_flags.
REAL_SERVER_POISSON := qwen2_5_vl_7b=$(RS)/qwen2_5_vl_7b-c5d3ab6-profile-h100/gpu-serve-qwen2_5_vl_7b.tar.xz \
	qwen3_vl_8b=$(RS)/qwen3_vl_8b-db1d93c-default-h100/gpu-serve-qwen3_vl_8b.tar.xz \
	gemma4_e4b=$(RS)/gemma4_e4b-1a3705d-poisson-h100/gpu-serve-gemma4_e4b.tar.xz \
	gemma3_12b=$(RS)/gemma3_12b-351b609-g3graphs/gpu-serve-gemma3_12b.tar.xz \
	gemma3_12b=$(RS)/gemma3_12b-974577e-mmsdpa-h100/gpu-serve-gemma3_12b.tar.xz
real-server-summary: $(VENV)/.test-installed
	rm -rf build/real_server_raw build/real_server_timeline build/real_server_lone build/real_server_poisson
	mkdir -p build/real_server_raw build/real_server_timeline build/real_server_lone build/real_server_poisson
	for pair in $(REAL_SERVER_RAW); do tar -xf $${pair#*=} -C build/real_server_raw; done
	for item in $(REAL_SERVER_TIMELINE); do archive=$${item#*=}; mkdir -p build/real_server_timeline/$${item##*@}; \
		tar -xf $${archive%@*} -C build/real_server_timeline/$${item##*@}; done
	for pair in $(REAL_SERVER_LONE); do tar -xf $${pair#*=} -C build/real_server_lone; done
	for pair in $(REAL_SERVER_POISSON); do archive=$${pair#*=}; run=build/real_server_poisson/$$(basename $$(dirname $$archive)); \
		mkdir -p $$run; tar -xf $$archive -C $$run; done
	$(PY) scripts/gpu_serve/summarize.py $(REAL_SERVER_RUNS) --out benchmarks/results/real_server_summary.json \
		$(foreach pair,$(REAL_SERVER_RAW),--raw $(firstword $(subst =, ,$(pair)))=build/real_server_raw/$(firstword $(subst =, ,$(pair)))) \
		$(foreach item,$(REAL_SERVER_TIMELINE),--timeline $(firstword $(subst =, ,$(item)))=build/real_server_timeline/$(lastword $(subst @, ,$(item)))/$(firstword $(subst =, ,$(item)))@$(lastword $(subst @, ,$(item)))) \
		$(foreach pair,$(REAL_SERVER_LONE),--lone $(firstword $(subst =, ,$(pair)))=build/real_server_lone/$(firstword $(subst =, ,$(pair)))) \
		$(foreach pair,$(REAL_SERVER_POISSON),--poisson $(firstword $(subst =, ,$(pair)))=build/real_server_poisson/$(notdir $(patsubst %/,%,$(dir $(lastword $(subst =, ,$(pair))))))/$(firstword $(subst =, ,$(pair))))
