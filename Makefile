# `make run` and `make test` work on a fresh machine: both first install the locked environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# Each `make run` trains into a fresh directory; pass WORKDIR=... to reuse (and resume) one.
RUN_ID := $(shell date +%Y%m%d-%H%M%S)
WORKDIR ?= runs/digits_cnn-$(RUN_ID)
CONFIG ?= configs/digits_cnn.py
# Exported versions land in $(EXPORT_BASE)/<version>, the layout TF Serving reads.
EXPORT_BASE ?= runs/models/digits
MODEL_NAME ?= digits
# The TF Serving model config file `promote` keeps the labels in.
MODEL_CONFIG ?= runs/models/models.config

.PHONY: install install-train run pipeline-smoke test lint format bench clean

# The training side alone (no TensorFlow), e.g. for GPU/TPU images.
$(BIN)/.installed-train: requirements.lock setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.lock
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

# Everything: training plus the serving side (TensorFlow, TF Serving APIs, orbax-export).
$(BIN)/.installed: $(BIN)/.installed-train requirements-serving.lock
	$(PIP) -r requirements.lock -r requirements-serving.lock
	touch $@

install-train: $(BIN)/.installed-train

install: $(BIN)/.installed

# `make run`: train -> register (export) -> validate (against the current production version,
# if any) -> promote to production -> serve the generated model config -> one gRPC Predict by
# the label `production` -> lineage. The registry is MLflow's SQLite store in the project root.
run: install
	$(BIN)/python -m trainer.main --config=$(CONFIG) --workdir=$(WORKDIR)
	$(BIN)/python -m mlops.registry register --workdir=$(WORKDIR) --export_base=$(EXPORT_BASE) \
	  --name=$(MODEL_NAME) > $(WORKDIR)/registered.txt && cat $(WORKDIR)/registered.txt
	version=$$(sed -n 's/.* version \([0-9]*\): .*/\1/p' $(WORKDIR)/registered.txt) && \
	  $(BIN)/python -m mlops.validate --name=$(MODEL_NAME) --candidate=$$version && \
	  $(BIN)/python -m mlops.registry promote --name=$(MODEL_NAME) --version=$$version \
	    --alias=production --model_config_file=$(MODEL_CONFIG) --reason="make run"
	PYTHON=$(abspath $(BIN))/python scripts/serve_and_query.sh $(MODEL_CONFIG) $(MODEL_NAME) production
	$(BIN)/python -m mlops.registry lineage $(MODEL_NAME)@production
	@echo "browse the runs and the registry: $(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}"

# The smoke pipeline CI runs (.ci/run, .github/workflows/ml.yml): train -> register -> validate
# -> promote a 20-step digits model with the smoke gate, into a fresh MLflow store and export base
# under $(PIPELINE_SMOKE_DIR). Exit 2 when the gate fails, 1 when a step fails.
PIPELINE_SMOKE_DIR ?= runs/pipeline-smoke
pipeline-smoke: install
	rm -rf $(PIPELINE_SMOKE_DIR) && mkdir -p $(PIPELINE_SMOKE_DIR)
	MLFLOW_TRACKING_URI=sqlite:///$(abspath $(PIPELINE_SMOKE_DIR))/mlflow.db \
	  $(BIN)/python -m mlops.pipeline run --config=configs/digits_cnn.py:smoke --name=digits \
	  --root=$(PIPELINE_SMOKE_DIR)/pipeline --export_base=$(PIPELINE_SMOKE_DIR)/models/digits \
	  --gate=configs/gates/smoke.py --trigger=ci

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	env -u XLA_FLAGS $(BIN)/python bench/trainer_overhead.py
	env -u XLA_FLAGS $(BIN)/python bench/lm_throughput.py
	env -u XLA_FLAGS $(BIN)/python bench/export_latency.py
	$(BIN)/python bench/multihost.py
	env -u XLA_FLAGS $(BIN)/python bench/serving_latency.py
	env -u XLA_FLAGS $(BIN)/python bench/tracking.py
	env -u XLA_FLAGS $(BIN)/python bench/registry_gate.py

clean:
	rm -rf $(VENV) runs build *.egg-info
