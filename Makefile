# lmcache-fs: every target does its own setup on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmcache-fs-installed
# CPU torch wheels: PyTorch's own index on a user's machine (pip finds a local wheel first where one exists).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,frontend,test]" \
	  || $(PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) -e ".[cpu,frontend,test]"
	# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch and break transformers.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -rs tests

test-fast: install
	$(PY) -m pytest -q -rs -m "not engine" tests

demo: install
	$(PY) frontend/launcher.py

bench: install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .cache tests/artifacts
