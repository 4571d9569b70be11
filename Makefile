# `make train` and `make test` set themselves up: they create .venv and install the
# project into it (unless a virtual environment is already active), then run.
PYTHON ?= python3
TORCH ?= torch==2.13.0
ARGS ?=

ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else
BIN := .venv/bin
endif
STAMP := $(BIN)/.minimax-train-installed

.PHONY: install train test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv .venv
	$(BIN)/python -m pip install -q --upgrade pip
	@# Install torch explicitly first so the wheel the machine wants (CPU or CUDA) is chosen, not a resolver's pick.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	@touch $@

train: $(STAMP)
	$(BIN)/python -m trainer.train $(ARGS)

# Triton kernels run under the interpreter on CPU; GPU-only tests skip themselves.
test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest tests $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf outputs .pytest_cache
