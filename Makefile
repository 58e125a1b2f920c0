# The front door: `make demo` and `make test` work in a fresh clone with Python 3.11 + pip.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# DVC stages call `segloop`; make it the venv's one.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo test bench ui clean

setup: $(VENV)/.installed

# Re-runs only when the pins or the project metadata change; otherwise a no-op.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The pipeline, then the first champion: the trained model is gated on base's held-out set
# (no champion yet: absolute floors decide). A re-run with nothing new decides nothing.
demo: setup
	$(BIN)/dvc repro
	$(BIN)/segloop report reports/eval
	$(BIN)/segloop gate --candidate latest --target base --data base=data/split/base/test --out reports/gate
	$(BIN)/segloop models list

test: setup
	$(BIN)/python -m pytest

# Benchmarks write reports/bench/<name>.json + a plot; each states what it measured.
bench: setup
	$(BIN)/python benchmarks/drift.py
	$(BIN)/python benchmarks/continual.py
	$(BIN)/python benchmarks/class_incremental.py

# The project's own store (tracking.uri: null): runs and registry in mlruns/mlflow.db,
# files in mlruns/artifacts. Loopback only; see README for a shared tracking server.
UI_PORT ?= 5000
ui: setup
	@mkdir -p mlruns/artifacts
	@echo "MLflow UI: http://127.0.0.1:$(UI_PORT)  (store: sqlite:///mlruns/mlflow.db, artifacts: mlruns/artifacts)"
	@# Job execution (huey workers) serves MLflow's GenAI features, not segloop: off saves 7 processes.
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --artifacts-destination mlruns/artifacts --host 127.0.0.1 --port $(UI_PORT)

clean:
	rm -rf data/raw data/valid data/split data/quarantine models reports
