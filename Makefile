# Two entry points: `make demo` and `make test`. Both create .venv and install the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
OUT ?= demo_out
export HF_HUB_OFFLINE := 1

.PHONY: demo test venv lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch/torchvision pinned to the wheels served from local disk on these machines
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test,fast]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/interptool demo --out $(OUT)

test: venv
	$(VENV)/bin/python -m pytest -n 2 -q

lint: venv
	$(VENV)/bin/ruff check interptool tests benchmarks examples

bench: venv
	$(PY) benchmarks/bench_cache.py
	$(PY) benchmarks/bench_dissect.py
	$(PY) benchmarks/bench_attribution.py

clean:
	rm -rf $(VENV) $(OUT)
