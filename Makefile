# One-command setup is built into every entry point: `make run`, `make test` and
# `make bench` create .venv with the pinned dependencies and check for mosquitto first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help setup run test lint firmware bench hil soak fuzz clean

help:
	@echo "make run       run the site demo (sets everything up first)"
	@echo "make test      lint, firmware build check and the whole test suite"
	@echo "make firmware  compile the firmware with mpy-cross into build/firmware/"
	@echo "make hil       replay the in-repo HIL scenario suite on the sim target (report in build/hil)"
	@echo "make bench     benchmarks against in-run baselines (build/bench/results.md)"
	@echo "make soak      fault soak: 20+ columns, broker restarts, gateway kills, bus noise (~10 min)"
	@echo "make fuzz      fuzz every input parser, 10^6 inputs per target (FUZZ_INPUTS=N, ARGS=\"--target NAME\")"
	@echo "make setup     only create .venv and check mosquitto"

setup: $(STAMP) mosquitto-check

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

.PHONY: mosquitto-check
mosquitto-check:
	@bash .ci/ensure-mosquitto

lint: setup
	$(VENV)/bin/ruff check .

firmware: setup
	$(PY) -m tools.firmware_build

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m tools.firmware_build
	$(PY) -m pytest

run: setup
	$(PY) -m hil demo $(ARGS)

hil: setup
	$(PY) -m hil suite --target sim --report build/hil

bench: setup
	$(PY) -m bench

soak: setup
	$(PY) -m hil soak --report build/soak $(ARGS)

fuzz: setup
	$(PY) -m fuzz $(ARGS)

clean:
	rm -rf build .pytest_cache
