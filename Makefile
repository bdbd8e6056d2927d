# Two commands on a fresh machine: `make demo` and `make test` (both create .venv if missing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]' 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import sophon_ray, torch, torchvision, ray, mlflow, diffusers, pyarrow"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sophon-ray run digits

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## unit tests only: no Ray, no MLflow server, under a minute
	$(BIN)/python -m pytest -q tests/unit

bench: $(STAMP)
	$(BIN)/python benchmarks/core_step.py

clean:
	rm -rf out .pytest_cache
