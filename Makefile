# Benchmarks: polytope side by side with convex_adversarial (see benchmarks/run.py).
# PYTHON is the project environment; the reference environment (benchmarks/.venv-ref) is made on first use.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
BENCH_ARGS ?=

.PHONY: bench bench-quick

bench:
	$(PYTHON) benchmarks/run.py $(BENCH_ARGS)

bench-quick:
	$(PYTHON) benchmarks/run.py --quick $(BENCH_ARGS)
