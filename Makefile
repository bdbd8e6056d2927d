# Two commands on a fresh machine: `make demo` and `make test` (both create .venv if missing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-fast test-slow gpu-check-dry bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import sophon_ray, torch, torchvision, ray, mlflow, diffusers, pyarrow"
	touch $(STAMP)

demo: $(STAMP)  ## mnist-to-digits-demo: full audit + the paper's protocol side by side (< 10 min on 2 cores)
	OMP_NUM_THREADS=1 $(BIN)/sophon-ray run mnist-to-digits-demo --paper

test: $(STAMP)  ## unit + integration + e2e but the slow and multi-node ones (< 15 min on 2 cores)
	$(BIN)/python -m pytest -q -m "not cluster and not slow" --durations=15

test-slow: $(STAMP)  ## the slow tests only, with the two-node Ray cluster tests (~18 min on 2 busy cores)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "slow or cluster"

gpu-check-dry: $(STAMP)  ## benchmarks/gpu_check.sh's code paths on CPU at tiny sizes
	OMP_NUM_THREADS=1 OUT=$${OUT:-/tmp/gpu-check} benchmarks/gpu_check.sh --dry-run

test-fast: $(STAMP)  ## unit tests only: no Ray, no MLflow server, under a minute
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/core_step.py

clean:
	rm -rf out .pytest_cache
