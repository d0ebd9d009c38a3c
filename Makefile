# `make demo`: the whole pipeline on CPU in minutes.  `make test`: the test suite.
# Both create .venv in the repository root when it is absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.unicom-installed

.PHONY: demo test test-all benchmarks clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m unicom.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter true,$(CI)),--run-slow,)

test-all: $(STAMP)
	$(PY) -m pytest -q --run-slow --run-heavy

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
