# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: these machines carry that CPU wheel locally, and an
# unpinned torch would pull the newest CUDA build (several GB) from the registry.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test lint demo bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev,notebooks]"
	touch $@

venv: $(BIN)/.installed

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check .

demo: venv
	$(BIN)/mmret study run analysis/studies/default.yaml

bench: venv
	$(BIN)/python benchmarks/capture.py

clean:
	rm -rf $(VENV) results build *.egg-info
