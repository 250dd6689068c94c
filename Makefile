# Two entry points that set everything up on a fresh machine:
#   make demo   prune all-MiniLM-L6-v2 within a fidelity budget, distill briefly, compile it, print fidelity and speed side by side
#   make test   run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparsecc-installed
BENCH  := $(VENV)/.sparsecc-bench-installed
BROWSER := $(VENV)/.sparsecc-browser-installed

.PHONY: demo test bench fuzz venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the registry serves a CPU wheel for exactly 2.13.0
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(BENCH): $(STAMP)
	# onnxruntime and onnx: the demo's onnxruntime column and the benchmarks' peers
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH)

$(BROWSER): $(STAMP)
	# Debian's chromium + chromedriver (tests/test_report_html.py) and Graphviz's dot (sparsecc.report), when
	# missing (CI runs as root). A failed install leaves the suite running: the browser test then skips.
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v dot >/dev/null; then \
	  touch $(BROWSER); \
	elif (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver graphviz); then \
	  touch $(BROWSER); \
	else echo "warning: apt-get install chromium chromium-driver graphviz failed; tests/test_report_html.py will skip"; fi

venv: $(STAMP)

demo: $(BENCH)
	HF_HUB_OFFLINE=1 $(PY) examples/minilm.py

test: $(STAMP) $(BROWSER)
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/linear.py

fuzz: $(STAMP)
	# the long fuzz profile (make test runs a bounded one): generated models against prune's reference
	$(PY) benchmarks/fuzz.py --examples 500

clean:
	rm -rf $(VENV) build *.egg-info
