# Two commands: `make test` and `make demo`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,experiments]'
	touch $(STAMP)

test: $(STAMP) native
	$(BIN)/python -m pytest -q tests

demo: $(STAMP) native
	$(BIN)/kronjax run configs/quickstart.toml --out runs/quickstart

# Builds the native CPU kernels into the cache now, not at the first step (~15 s once; with
# no C++ compiler it says so and kronjax runs on XLA). Same as python -m kronjax._src.native.
.PHONY: native
native: $(STAMP)
	$(BIN)/python -c 'import sys; from kronjax._src import native; sys.exit(native.main())'

# The benchmark scripts behind the README's performance tables (minutes; not part of CI).
bench: $(STAMP)
	$(BIN)/python experiments/bench_step.py
	$(BIN)/python experiments/bench_threshold.py
	$(BIN)/python experiments/bench_init.py
	$(BIN)/python experiments/bench_sweep.py
	$(BIN)/python experiments/bench_sharding.py

clean:
	rm -rf $(VENV) runs .pytest_cache
