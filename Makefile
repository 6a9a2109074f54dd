# Everything starts from a fresh clone: `make demo` and `make test` set up .venv themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: setup demo test lint unit fuzz bench bench-load bench-save bench-convert bench-convert-8b bench-memory bench-inspect-many bench-merge bench-combine bench-extract completions clean llamacpp-env vllm-env

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, the exact CPU build on this machine's disk; a bare `torch` pulls a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash demo/run.sh

lint: setup
	$(BIN)/ruff check adapterctl tests benchmarks demo
	$(BIN)/ruff format --check adapterctl tests benchmarks demo
	$(BIN)/lint-imports
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest

# llama.cpp's own LoRA converter is the oracle of `inspect --engine llama.cpp` (tests/lib/
# test_llamacpp_oracle.py): fetched from the package registry before the suite; where that
# fails, those tests skip and say how to build it
test: lint
	-$(MAKE) --no-print-directory llamacpp-env
	$(MAKE) --no-print-directory unit

# llama.cpp's LoRA converter (from llama-cpp-python's sdist) for tests/lib/test_llamacpp_oracle.py
llamacpp-env: setup
	$(BIN)/python -m tests.llamacpp_env

# vLLM's own LoRA loading code (0.34.0 and 0.11.2) for tests/lib/test_vllm_oracle.py, in side
# venvs: 1.5-2.5 min and about 2 GB each, so not part of `test`
vllm-env: setup
	$(BIN)/python -m tests.vllm_env --version 0.34.0
	$(BIN)/python -m tests.vllm_env --version 0.11.2

fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/properties -q

bench: setup
	$(BIN)/python -m benchmarks.run

bench-load: setup
	$(BIN)/python -m benchmarks.load

bench-save: setup
	$(BIN)/python -m benchmarks.save

bench-convert: setup
	$(BIN)/python -m benchmarks.convert

bench-convert-8b: setup
	$(BIN)/python -m benchmarks.convert_8b

bench-memory: setup
	$(BIN)/python -m benchmarks.memory

bench-inspect-many: setup
	$(BIN)/python -m benchmarks.inspect_many

bench-merge: setup
	$(BIN)/python -m benchmarks.merge

bench-combine: setup
	$(BIN)/python -m benchmarks.combine

# installs mergekit into its own cached environment (benchmarks/out/mergekit-env) on first use
bench-extract: setup
	$(BIN)/python -m benchmarks.extract

completions: setup
	$(BIN)/python -m pytest tests/test_repo_meta.py --update-golden -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
