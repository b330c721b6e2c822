# The two commands a newcomer types (see README.md): `make pipeline` and `make test`.
# Each creates the virtual environment on first use (pinned CPU stack, ~2-3 min).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Ray, torch and pytest write temp files under the checkout, not /tmp or $HOME;
# token auth stays off for the local Ray the jobs and tests start (ENVIRONMENT.md).
export RAY_AUTH_MODE ?= disabled
export TMPDIR := $(CURDIR)/.tmp
export RAY_TMPDIR := $(CURDIR)/.tmp
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export HF_HOME := $(CURDIR)/.cache/huggingface
export HF_HUB_OFFLINE := 1
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export PYTHONPATH := $(CURDIR)

.PHONY: venv pipeline demo test bench clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -e '.[dev]'
	@mkdir -p .tmp .cache
	touch $@

pipeline: venv
	@mkdir -p .tmp
	$(BIN)/python jobs/pipeline.py

demo: venv
	@mkdir -p .tmp
	$(BIN)/python jobs/demo.py

test: venv
	@mkdir -p .tmp
	$(BIN)/python -m pytest

bench: venv
	@mkdir -p .tmp
	$(BIN)/python bench/model_throughput.py

clean:
	rm -rf .tmp .cache outputs mlruns ray_results .pytest_cache
