# `make run` and `make test` work on a fresh machine: both first install the locked environment.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Each `make run` trains into a fresh directory; pass WORKDIR=... to reuse (and resume) one.
WORKDIR ?= runs/digits_cnn-$(shell date +%Y%m%d-%H%M%S)
CONFIG ?= configs/digits_cnn.py

.PHONY: install run test lint format bench clean

$(BIN)/.installed: requirements.lock setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/python -m trainer.main --config=$(CONFIG) --workdir=$(WORKDIR)

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/trainer_overhead.py

clean:
	rm -rf $(VENV) runs build *.egg-info
