# `make demo` sets up and runs the quick start; `make test` sets up and runs the whole suite
# (what CI runs); `make test-fast` leaves out the tests marked slow or perf; `make test-perf`
# runs only the implementation pins (HLO text, compiled temporaries). Each creates .venv if it
# is missing and installs only the extras it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
DEMO := $(VENV)/.installed-demo
TEST := $(VENV)/.installed-test

.PHONY: test test-fast test-perf demo venv clean bench results docs accelerator-check

venv: $(TEST)

$(BASE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	touch $(BASE)

$(DEMO): $(BASE)
	$(BIN)/python -m pip install --quiet -e '.[experiments]'
	touch $(DEMO)

$(TEST): $(BASE)
	$(BIN)/python -m pip install --quiet -e '.[dev,experiments,docs,pairwise]'
	touch $(TEST) $(DEMO)

# The tests run in one worker process per CPU (pytest-xdist): most of their time is single-threaded
# compilation.
test: $(TEST) native
	$(BIN)/python -m pytest -q -n auto --durations=15 tests

test-fast: $(TEST) native
	$(BIN)/python -m pytest -q -n auto --durations=10 -m "not slow and not perf" tests

test-perf: $(TEST) native
	$(BIN)/python -m pytest -q -n auto -m perf tests

demo: $(DEMO) native
	$(BIN)/kronjax run configs/quickstart.toml --out runs/quickstart

# Builds the native CPU kernels into the cache now, not at the first import (once; with no
# C++ compiler it says so and kronjax runs on XLA). Same as python -m kronjax._src.kernels.native.
.PHONY: native
native: $(DEMO)
	$(BIN)/python -c 'import sys; from kronjax._src.kernels import native; sys.exit(native.main())'

# Every benchmark behind the performance page, then the page's tables regenerated from their
# JSON (tens of minutes on 2 CPUs; not part of CI: the tests run the benchmarks' --smoke versions).
bench: $(TEST) native
	$(BIN)/python experiments/bench_step.py
	$(BIN)/python experiments/bench_threshold.py
	$(BIN)/python experiments/bench_init.py
	$(BIN)/python experiments/bench_init_scaling.py
	$(BIN)/python experiments/bench_kronecker_init.py
	$(BIN)/python experiments/bench_sweep.py
	$(BIN)/python experiments/bench_sweep.py --retain-freed-memory --out experiments/results/sweep_retain.json
	$(BIN)/python experiments/bench_sharding.py
	$(BIN)/python experiments/bench_auto.py
	$(BIN)/python experiments/hlo_costs.py
	$(BIN)/python experiments/bench_drift.py
	$(BIN)/python experiments/bench_checkpoint.py
	$(BIN)/python experiments/bench_pairwise.py
	$(BIN)/python experiments/bench_dispatch.py
	$(BIN)/python experiments/bench_contention.py
	$(BIN)/python docs/gen_tables.py --figure

# Every experiment behind the results page, written into experiments/results/, then the tables
# regenerated (about half an hour on 2 CPUs).
EXPERIMENTS := quickstart scaling_d convergence scaling_m sparsity norms sweep_grid init_law
RUN := $(BIN)/kronjax run --no-progress
results: $(TEST) native
	for name in $(EXPERIMENTS); do \
	  $(RUN) configs/$$name.toml --out experiments/results/$$name || exit 1; done
	$(RUN) configs/digit_pairs.toml --out experiments/results/digit_pairs
	$(RUN) configs/digit_pairs.toml --set params.learning_rate=16.0 --out experiments/results/digit_pairs/lr16
	$(RUN) configs/digit_pairs.toml --set params.images_per_input=3 --out experiments/results/digit_pairs/three_images
	$(RUN) configs/digit_pairs.toml --set params.images_per_input=3 --set params.learning_rate=16.0 \
	  --out experiments/results/digit_pairs/three_images/lr16
	$(BIN)/python docs/gen_tables.py --figure

# The documentation site: regenerates the tables of numbers from experiments/results/, then
# builds docs/ into site/ with mkdocs (strict: a warning is an error).
docs: $(TEST)
	$(BIN)/python docs/gen_tables.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# On a GPU or TPU machine (install its JAX build into .venv first): the accelerator-relevant tests
# and small benchmarks, under 8 minutes, JSON in experiments/results/accelerator/. On a CPU-only
# machine it says so and exits 0.
accelerator-check: $(TEST)
	$(BIN)/python experiments/accelerator_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache
