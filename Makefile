# Two commands do everything: `make run` (ends with the run's report.html) and `make test`. Each sets up first (idempotent, seconds
# when already done). `make bench` runs the CPU benchmarks.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test bench clean
setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/lmsrun configs/quickstart.yaml
	$(VENV)/bin/lmsrun report runs/quickstart

test: setup
	$(PY) -m pytest -ra $(PYTEST_ARGS)

bench: setup
	$(PY) scripts/bench_swap.py
	$(PY) scripts/bench_comm.py
	$(PY) scripts/bench_launch.py

clean:
	rm -rf $(VENV) build *.egg-info runs
