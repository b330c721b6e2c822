# The two commands a newcomer types (see README.md): `make pipeline` and `make test`; `make ui` shows what ran.
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

.PHONY: venv chromium pipeline demo ui test bench clean

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

# The MLflow UI on the pipeline's store (outputs/pipeline/mlflow.db) and the Ray dashboard's address;
# Ctrl-C stops it. UI_ARGS passes settings: make ui UI_ARGS="--set port=5001".
ui: venv
	@mkdir -p .tmp
	$(BIN)/python jobs/ui.py $(UI_ARGS)

# The playground's browser tests drive Debian's Chromium through Playwright (which must not download a
# browser of its own): install it when missing, as root (CI) or with password-less sudo, else stop here.
CHROMIUM := /usr/bin/chromium
APT_CHROMIUM := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

chromium:
	@test -x $(CHROMIUM) || { \
	  echo "installing Chromium for the playground's browser tests (apt-get install chromium)"; \
	  if [ "$$(id -u)" = 0 ]; then sh -c '$(APT_CHROMIUM)'; \
	  elif sudo -n true 2>/dev/null; then sudo sh -c '$(APT_CHROMIUM)'; fi; }
	@test -x $(CHROMIUM) || { echo "make test: $(CHROMIUM) is missing and could not be installed (needs root or" \
	  "password-less sudo): run 'sudo apt-get install chromium' and retry" >&2; exit 1; }

test: venv chromium
	@mkdir -p .tmp
	$(BIN)/python -m pytest

bench: venv
	@mkdir -p .tmp
	$(BIN)/python bench/model_throughput.py

clean:
	rm -rf .tmp .cache outputs mlruns ray_results .pytest_cache
