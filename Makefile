# mmpipe: two commands for a fresh machine.
#   make demo   the whole nightly loop on synthetic studies (installs if needed)
#   make test   the whole test suite (installs if needed)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1

.PHONY: install demo demo-full test lint format clean stop

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=24"
	$(BIN)/python -m pip install -qq -c constraints.txt -e ".[airflow,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: install
	$(BIN)/mmpipe demo

demo-full: install
	$(BIN)/mmpipe demo --profile full

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

stop:
	-$(BIN)/mmpipe store serve --stop

clean: stop
	rm -rf .mmpipe
