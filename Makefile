# mmpipe: two commands for a fresh machine.
#   make demo   the whole nightly loop on synthetic studies (installs if needed)
#   make test   the whole test suite (installs if needed, Chromium for the browser test included)
#   make ui     the Airflow UI on the demo's runs, at http://127.0.0.1:8080

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1

.PHONY: install browser demo demo-full ui test lint format clean stop

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade "pip>=24"
	$(BIN)/python -m pip install -qq -c constraints.txt -e ".[airflow,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

# The browser test drives the operating system's Chromium (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing Chromium for the browser test (apt-get, about 2 minutes)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(BIN)/mmpipe demo

demo-full: install
	$(BIN)/mmpipe demo --profile full

ui: install
	$(BIN)/mmpipe ui

test: install browser
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
