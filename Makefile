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

.PHONY: install install-train run test lint format bench clean

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

run: install
	$(BIN)/python -m trainer.main --config=$(CONFIG) --workdir=$(WORKDIR)
	$(BIN)/python -m serving.export --workdir=$(WORKDIR) --export_base=$(EXPORT_BASE)
	scripts/serve_and_query.sh $(EXPORT_BASE) digits

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

clean:
	rm -rf $(VENV) runs build *.egg-info
