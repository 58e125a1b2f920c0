# The front door: `make demo` and `make test` work in a fresh clone with Python 3.11 + pip.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# DVC stages call `segloop`; make it the venv's one.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Prefect keeps its database (flow runs of `make demo`, served deployments) in the project;
# its anonymous usage heartbeat is off (no network here, and it only adds log noise).
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo lint test test-crash bench ui prefect-ui evidently-ui screenshot serve monitor stack stack-down demo-stack clean

setup: $(VENV)/.installed

# Re-runs only when the pins or the project metadata change; otherwise a no-op.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The continual loop (flows/demo.py): bootstrap a champion on base, then stream batches
# through monitor_flow; workspace/ is the loop's own git + DVC repo (ignored here), the
# runs land in this project's MLflow store and Prefect database. A re-run continues.
# Fixed epochs (not the wall-clock budget) so that every machine trains the same steps;
# 96-pixel crops instead of the planned 128 keep the whole demo near 15 minutes on 2 cores.
# Local contrast normalisation (model.norm.kind local) and blur among the augmentations (the
# plan's, plus train.augment.blur_sigma): a base champion so trained already segments lowlight
# and fog (docs/loop_stream.md measures both, 3 seeds); the loop trains on what it cannot.
DEMO_AUGMENT := {hflip: 0.5, vflip: 0.5, rot90: 0.5, brightness: 0.2, contrast: 0.2, gamma: 0.2, blur_sigma: 1.5}
DEMO_SETS := --set train.max_minutes=null --set train.epochs=16 --set data.crop_size=96 \
  --set continual.epochs=8 --set model.norm.kind=local --set 'train.augment=$(DEMO_AUGMENT)'
demo: setup
	$(BIN)/python -m flows.demo $(DEMO_SETS)

# The demo on the stack (`make stack` first): the same batches, each monitor run a run of the
# deployment segloop-demo that a worker of the pool picks up; runs and models in the stack's
# MLflow server (PostgreSQL, artifacts in S3), its own workspace-stack/ and reports/demo-stack/;
# then screenshots of the stack's MLflow and Prefect UIs (reports/ui/stack/). DEMO_ARGS: more
# flows.demo arguments (a shorter --stream, more --set).
demo-stack: setup
	@test -f .stack/env || { echo "no stack here (.stack/env): run make stack first"; exit 2; }
	. ./.stack/env && $(BIN)/python -m flows.demo --pool $$SEGLOOP_WORK_POOL --out reports/demo-stack $(DEMO_SETS) \
	  --set flows.workspace=workspace-stack --set drift.evidently_workspace=evidently-stack $(DEMO_ARGS)
	. ./.stack/env && $(BIN)/python scripts/screenshot_ui.py --url $$MLFLOW_TRACKING_URI --out reports/ui/stack \
	  && $(BIN)/python scripts/screenshot_prefect.py --api $$PREFECT_API_URL --out reports/ui/stack

# Lint, format and type checks (pyproject.toml: [tool.ruff], [tool.mypy]); `make test` runs them first.
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy src

test: lint
	$(BIN)/python -m pytest

# The crash-injection test at all 22 write boundaries of a loop step (make test runs 3 of them).
test-crash: setup
	SEGLOOP_CRASH_ALL=1 $(BIN)/python -m pytest -n 1 tests/test_loop_integrity.py

# Benchmarks write reports/bench/<name>.json + a plot; each states what it measured.
# Runs every benchmarks/*.py with a progress line, then the table reports/bench/README.md.
bench: setup
	$(BIN)/python benchmarks/run_all.py

# The project's own store (tracking.uri: null): runs and registry in mlruns/mlflow.db,
# files in mlruns/artifacts. Loopback only; see README for a shared tracking server.
# Served on 127.0.0.2 (loopback too): MLflow 3.17's UI opens its GenAI assistant panel over a
# third of every page for localhost/127.0.0.1 only, and has no setting to turn it off.
# The links open the model-training view (training runs, Models) instead of the GenAI one.
# Host and origin allowed: MLflow's guards accept only localhost by default (runs pages fail).
UI_HOST ?= 127.0.0.2
UI_PORT ?= 5000
ui: setup
	@mkdir -p mlruns/artifacts
	@$(BIN)/python scripts/ui_links.py --store mlruns/mlflow.db --base http://$(UI_HOST):$(UI_PORT)
	@echo "(store: sqlite:///mlruns/mlflow.db, artifacts: mlruns/artifacts)"
	@# Job execution (huey workers) serves MLflow's GenAI features, not segloop: off saves 7 processes.
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db \
	  --artifacts-destination mlruns/artifacts --host $(UI_HOST) --port $(UI_PORT) --allowed-hosts $(UI_HOST):$(UI_PORT) \
	  --cors-allowed-origins http://$(UI_HOST):$(UI_PORT)

# Headless-Chromium screenshots of the MLflow UI as `make ui` serves it: landing page, the
# experiment's runs, the registered model and its champion's version (reports/ui/*.png),
# from the project store; needs Debian's chromium (see the script).
# ... and of the Prefect UI on the demo's flow runs (reports/ui/prefect_*.png), and of the
# Evidently UI's drift dashboard (reports/ui/evidently_dashboard.png).
screenshot: setup
	$(BIN)/python scripts/screenshot_ui.py --store mlruns/mlflow.db --out reports/ui
	$(BIN)/python scripts/screenshot_prefect.py --home .prefect --out reports/ui
	$(BIN)/python scripts/screenshot_evidently.py --params params.yaml --out reports/ui

# The Prefect UI on the project's database: the demo's monitor and continual flow runs.
prefect-ui: setup
	@echo "Prefect UI: http://127.0.0.1:4200  (database: $(PREFECT_HOME)/prefect.db)"
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

# The Evidently UI on the loop's drift checks over time (drift.evidently_workspace, default
# evidently/): one project per registered model, its dashboard on the Dashboard tab. Loopback;
# port 8001 (8000 is `make serve`). DO_NOT_TRACK: Evidently's usage telemetry off (no network here).
EVIDENTLY_PORT ?= 8001
evidently-ui: setup
	@mkdir -p evidently
	@echo "Evidently UI: http://127.0.0.1:$(EVIDENTLY_PORT)  (workspace: evidently/)"
	DO_NOT_TRACK=1 $(BIN)/evidently ui --workspace evidently --host 127.0.0.1 --port $(EVIDENTLY_PORT)

# The champion as an HTTP service (README: Serving): models:/segloop@champion, followed live
# (serve.poll_s and POST /v1/reload), on 127.0.0.1:8000, with /metrics.
serve: setup
	$(BIN)/segloop serve

# The service and Debian's Prometheus on loopback, scraping it (monitoring/); UI on :9090.
# While it runs, `python scripts/screenshot_monitor.py` saves its graph page (reports/ui/).
monitor: setup
	scripts/monitor.sh

# The scale-out stack on this machine (scripts/stack.py; README "From one machine to many"):
# PostgreSQL (.stack/pg), a loopback S3 (moto), the MLflow server on PostgreSQL serving artifacts
# from S3, the Prefect server on PostgreSQL, a process work pool and STACK_WORKERS workers; it
# prints every URL and writes .stack/env (`source .stack/env`). STACK_ARGS=--auth: MLflow basic auth.
STACK_WORKERS ?= 2
stack: setup
	$(BIN)/python scripts/stack.py up --workers $(STACK_WORKERS) $(STACK_ARGS)

stack-down:
	$(BIN)/python scripts/stack.py down

# Everything the pipeline and the demo produced: data, models, reports, the loop's
# workspace, the MLflow store and the Prefect database.
clean:
	rm -rf data/raw data/valid data/split data/quarantine models reports workspace workspace-stack evidently evidently-stack .prefect .cache mlruns/mlflow.db mlruns/artifacts
