# Two entry points that set everything up on a fresh machine:
#   make demo   compile all-MiniLM-L6-v2 at 90% block sparsity and print its report and timings
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparsecc-installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the registry serves a CPU wheel for exactly 2.13.0
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/minilm.py

test: $(STAMP)
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/linear.py

clean:
	rm -rf $(VENV) build *.egg-info
