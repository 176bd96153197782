# Dev habits in one place; CI calls `make test` too (.ci/run).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup run migrate test test-fast lint bench clean

setup:
	@scripts/setup.sh

run: setup
	$(PY) -m local.run

# the database of TMUXI_DATABASE_URL (the local stack migrates its own embedded PostgreSQL when it starts)
migrate: setup
	$(PY) -m tmuxi.db.migrate

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check layers functions tmux_host local tests bench
	$(PY) -m mypy layers/tmuxi functions tmux_host local

bench: setup
	@scripts/setup.sh wrk
	$(PY) bench/run_all.py

clean:
	rm -rf .data .pytest_cache
