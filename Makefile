# r1lab: `make demo` and `make test` are the whole set-up on a fresh machine: both create .venv when it is
# missing and install the project into it (scripts/install.sh).
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.r1lab-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all bench clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(STAMP)

## The main job: a miniature R1 pipeline on tiny models built on the spot (see README).
demo: $(STAMP)
	$(PY) launch/pipeline.py --config configs/demo.yaml

## Default test run (fast tier, < ~15 min on 2 CPU cores). pytest exits 5 when no test ran: that fails too.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests

## Long-running tests (full benchmark sweeps, distillation runs).
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

## Throughput benchmarks (timing targets live here, never in tests).
bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs/ .cache/ .pytest_cache/
