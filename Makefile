# jaxnorm: `make demo` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_WORKERS ?= 2

.PHONY: demo test test-fast lint docs doctest bench train clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

## The main job: signal propagation at initialization under every normalization (offline).
demo: $(STAMP)
	$(PY) experiments/signal_propagation.py

## The whole test suite: lint, the docs build (warnings are errors), docstring examples, unit and
## integration tests.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(MAKE) --no-print-directory docs
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q -p no:cacheprovider tests jaxnorm \
	  --doctest-modules

## Unit tests only: the inner loop.
test-fast: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q -p no:cacheprovider -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

## The documentation site (Sphinx + MyST) in docs/_build/html; warnings are errors.
docs: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

## Docstring examples only.
doctest: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --doctest-modules jaxnorm

## The quickstart training run (WORKDIR=... to choose where it writes; rerun to resume).
WORKDIR ?= results/quickstart
train: $(STAMP)
	$(PY) experiments/train.py --config=experiments/configs/quickstart.py:smoke --workdir=$(WORKDIR)

bench: $(STAMP)
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) results *.egg-info docs/_build docs/api/generated docs/colabs tests/.xla_cache
