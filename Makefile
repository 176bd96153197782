# Dev habits in one place; CI calls `make test` too (.ci/run).
PY := .venv/bin/python
PYTEST_ARGS ?=
CDK_CLI := 2.1148.1

.PHONY: setup run migrate test test-fast lint bench clean lambda-build synth

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
	$(PY) -m ruff check layers functions tmux_host local cdk ops tests bench
	$(PY) -m mypy layers/tmuxi functions tmux_host local cdk ops
	$(PY) -m mypy -m layers.build

bench: setup
	@scripts/setup.sh wrk
	$(PY) bench/run_all.py

# the Lambda layer and every function, for arm64 / Python 3.12 (build/lambda/layer, build/lambda/<name>): what
# `cdk synth` bundles; the wheels are cached in build/pip-cache. The locks: $(PY) -m layers.build lock
lambda-build: setup
	$(PY) -m layers.build all build/lambda

# every environment's CloudFormation template into cdk.out/ (no AWS credentials needed; cdk-nag runs)
synth: setup
	npx --yes aws-cdk@$(CDK_CLI) synth --quiet

clean:
	rm -rf .data .pytest_cache
