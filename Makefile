# The two commands a newcomer needs:  make demo   and   make test
# Each creates .venv and installs the pinned dependencies on first use.

PYTHON      ?= python3.11
VENV        ?= .venv
BIN         := $(VENV)/bin
TORCH       ?= torch==2.13.0
CHECKPOINT  ?=
PROFILE     ?= tiny
HTTP_PORT   ?= 8000
GRPC_PORT   ?= 8001
METRICS_PORT ?= 8002
OPENAI_PORT ?=
TOPOLOGY    ?= all
ARGS        ?=
PYTEST_ARGS ?=
USERS       ?= 4
DURATION    ?= 30
URL         ?=
CLUSTER     ?=

.PHONY: venv demo test lint serve cluster checkpoint clean load-test tools gpu-bundle soak perf perf-analyzer \
	bench-cluster

venv: $(BIN)/.installed $(BIN)/.llama_cpp

# torch goes in first and alone, as a CPU build; nothing installed after it may replace it.
$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r requirements.txt "$(TORCH)"
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import numpy; assert numpy.__version__ < '2', 'numpy must be < 2 for the Triton 2.51 Python backend'"
	touch $@

# llama-cpp-python, the ggml runner's bindings to llama.cpp: built from its pinned source distribution
# for this host's CPU (minutes on 2 cores, once: pip caches the wheel; builders/llamacpp/build.py).
$(BIN)/.llama_cpp: $(BIN)/.installed builders/llamacpp/build.py builders/llamacpp/python_lib.cmake
	$(BIN)/python builders/llamacpp/build.py --python-package
	$(BIN)/python -c "import llama_cpp"
	touch $@

demo: venv
	$(BIN)/python -m client.demo $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),)

# Each run has its own pytest base folder, removed afterwards: pytest's default one under
# /tmp/pytest-of-<user> is shared, and its rotation deletes the folders of another session still
# running on the host (its servers' stubs then fail at start).
test: venv tools perf-analyzer lint
	base=$$(mktemp -d "$${TMPDIR:-/tmp}/qwen3vl-pytest.XXXXXX"); \
	$(BIN)/python -m pytest --basetemp="$$base" $(PYTEST_ARGS) tests; rc=$$?; rm -rf "$$base"; exit $$rc

# ruff, pinned in requirements.txt, configured in pyproject.toml: 0 findings
lint: venv
	$(BIN)/ruff check .

# System tools the tests use: docker-compose (1.29, Debian's package) validates docker-compose.yml
# offline; libb64 (Debian's libb64-0d) is what perf_analyzer links; nginx runs the compose file's
# HTTP front (docker/nginx/) before a real tritonserver. Installed when missing, as root with
# apt-get; otherwise the tests that need them say why they skip.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
	      || echo "warning: could not install docker-compose; the compose validation test will not pass"; \
	  else echo "note: docker-compose missing (install it as root with apt-get install docker-compose)"; fi; }
	@ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libb64-0d >/dev/null) \
	      || echo "warning: could not install libb64-0d; perf_analyzer will not run"; \
	  else echo "note: libb64-0d missing (install it as root with apt-get install libb64-0d)"; fi; }
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null) \
	      || echo "warning: could not install nginx; the HTTP front tests will skip"; \
	  else echo "note: nginx missing (install it as root with apt-get install nginx)"; fi; }

# perf_analyzer (Triton's load generator) in build/perf_analyzer: the tritonclient 2.51 wheel's binary,
# the newest that runs on Debian 12 (load_tests/perf-analyzer-requirements.txt says why), fetched by
# pip with pinned hashes, outside .venv.
perf-analyzer: venv tools
	$(BIN)/python -m load_tests.perf --install

# perf_analyzer against qwen3vl with an image (a PNG as a data URL), no admin key: prints its table.
# Without URL (a gRPC HOST:PORT) it serves the tiny checkpoint on free local ports for the run.
# CONCURRENCY=N, MEASUREMENT_MS=N (per window; at most 3 windows).
CONCURRENCY ?= 1
MEASUREMENT_MS ?= 5000
perf: perf-analyzer
	$(BIN)/python -m load_tests.perf --concurrency $(CONCURRENCY) --measurement-ms $(MEASUREMENT_MS) \
		$(if $(URL),--url $(URL),)

# Locust, headless and bounded: make load-test USERS=8 DURATION=60 [URL=host:8000] (gRPC on the next port;
# set QWEN3VL_GRPC_URL otherwise). Without URL it starts and stops a local server on the tiny checkpoint.
# CLUSTER=build/cluster.json: against a running `make cluster` (its encoder servers), and the report
# shows the spread of sequences over its language servers. Reports: load_tests/reports/.
load-test: venv
	$(BIN)/python -m load_tests.run --users $(USERS) --duration $(DURATION) $(if $(URL),--url $(URL),) \
		$(if $(CLUSTER),--cluster $(CLUSTER),)

# 1,000 sequences through the qwen3vl ensemble and the disaggregated servers at once (good, malformed,
# cancelled, abandoned, transfer faults): wrong outputs, failed good requests, and every server process's
# memory, threads, descriptors and shared memory at start, middle and end. SEQUENCES=N for another size.
SEQUENCES ?= 1000
soak: venv
	$(BIN)/python -m load_tests.soak --sequences $(SEQUENCES)

# A conversation's second turn across the split: rows moved and TTFT with the language server's row
# cache on and off, in one run (one encoder, two language servers, small profile)
.PHONY: bench-turns
bench-turns: venv
	$(BIN)/python -m load_tests.disagg_turns $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),)

checkpoint: venv
	$(BIN)/python -m qwen3vl_triton.model.tiny --profile $(PROFILE) --out checkpoints/$(PROFILE)

serve: venv
	$(BIN)/qwen3vl-serve $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),) --topology $(TOPOLOGY) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
		$(if $(OPENAI_PORT),--openai-port $(OPENAI_PORT),) $(ARGS)

# A loopback cluster: ENCODERS encoder servers and LANGUAGES language servers on 127.0.0.1; the front
# door (qwen3vl_disagg, and the OpenAI endpoint with OPENAI_PORT) on HTTP_PORT/GRPC_PORT
ENCODERS ?= 2
LANGUAGES ?= 3
cluster: venv
	$(BIN)/python -m qwen3vl_triton.serve.cluster --encoders $(ENCODERS) --languages $(LANGUAGES) \
		$(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) \
		$(if $(OPENAI_PORT),--openai-port $(OPENAI_PORT),) $(ARGS)

# keeps build/llamacpp (a 7-60 min build; `rm -rf build` drops it too)
clean:
	find build -mindepth 1 -maxdepth 1 ! -name llamacpp -exec rm -rf {} + 2>/dev/null || true
	rm -rf checkpoints load_tests/reports .pytest_cache

# What tests/gpu/device_check.sh needs on a GPU host beyond its image, in build/gpu-bundle (carried
# with the run): tritonserver 2.51 trimmed from the nvidia-pytriton wheel, and Python 3.12 wheels
# of numpy < 2 and tritonclient; pinned with hashes in tests/gpu/bundle-requirements.txt. Prints
# its size and fails past the 64 MiB a device call carries. The download and the compressed
# server are cached in build/gpu-cache.
gpu-bundle: venv
	$(BIN)/python -m tests.gpu.bundle

# The served stack against transformers and llama.cpp in the same run: table + JSON + PNG in
# load_tests/reports/ (bench-latest.json holds the target figures). QUICK=1: every row and every
# target figure, fewer requests. llama.cpp's llama-server is built once into build/llamacpp/
# (builders/llamacpp/build.py; `make llamacpp` builds it alone).
QUICK ?=
LLAMA_SERVER := build/llamacpp/bin/llama-server
.PHONY: bench bench-prefix llamacpp
bench: venv $(LLAMA_SERVER)
	$(BIN)/python -m load_tests.bench $(if $(QUICK),--quick,)

# Prefix KV reuse over HTTP (issue 23): a conversation's second turn against its first, the served
# stack (its OpenAI endpoint, the prefix cache on) in turn with llama-server (cache_prompt, its
# prompt cache on) on the same conversations, ROUNDS rounds after a warm-up; prints each round, the
# medians and ratios, the host's load and rates; JSON in load_tests/reports/prefix-ttft-latest.json
ROUNDS ?= 5
bench-prefix: venv $(LLAMA_SERVER)
	$(BIN)/python -m load_tests.prefix_ttft --served --llamacpp --rounds $(ROUNDS) \
		--json load_tests/reports/prefix-ttft-latest.json

llamacpp: $(LLAMA_SERVER)

# The loopback cluster (ENCODERS=2, LANGUAGES=3) against one encoder + one language server, started
# side by side and loaded in alternating rounds with the same requests: req/s, tokens/s, TTFT, ITL of
# each and cluster/pair, the spread over language servers, routing's cost per request (< 1 ms), the
# machine's rates. QUICK=1: fewer requests. Report: load_tests/reports/bench-cluster-latest.json.
bench-cluster: venv
	$(BIN)/python -m load_tests.bench_cluster $(if $(QUICK),--quick,) --encoders $(ENCODERS) \
		--languages $(LANGUAGES) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),)

# built when missing (not rebuilt when a source changes: the pinned source never does)
$(LLAMA_SERVER): | venv
	$(BIN)/python builders/llamacpp/build.py
