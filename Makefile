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

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/kronjax run configs/quickstart.toml --out runs/quickstart

# The benchmark scripts behind the README's performance tables (minutes; not part of CI).
bench: $(STAMP)
	$(BIN)/python -m experiments.bench_step
	$(BIN)/python -m experiments.bench_threshold
	$(BIN)/python experiments/bench_init.py
	$(BIN)/python experiments/bench_sweep.py
	$(BIN)/python experiments/bench_sharding.py

clean:
	rm -rf $(VENV) runs .pytest_cache
