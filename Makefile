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
TOPOLOGY    ?= all
PYTEST_ARGS ?=

.PHONY: venv demo test serve checkpoint clean

venv: $(BIN)/.installed

# torch goes in first and alone, as a CPU build; nothing installed after it may replace it.
$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r requirements.txt "$(TORCH)"
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import numpy; assert numpy.__version__ < '2', 'numpy must be < 2 for the Triton 2.51 Python backend'"
	touch $@

demo: venv
	$(BIN)/python -m client.demo $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests

checkpoint: venv
	$(BIN)/python -m qwen3vl_triton.tiny --profile $(PROFILE) --out checkpoints/$(PROFILE)

serve: venv
	$(BIN)/qwen3vl-serve $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),) --topology $(TOPOLOGY) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

clean:
	rm -rf build checkpoints load_tests/reports .pytest_cache
