# Tessera — `make` lists the targets.
SHELL := /bin/bash
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PROTOS := $(wildcard protos/tessera/v1/*.proto)

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/tessera: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

.PHONY: install
install: $(BIN)/tessera ## Create .venv and install Tessera with its dev tools

.PHONY: up
up: install ## Run all services (embedded PostgreSQL and Redis unless TESSERA_*_URL are set) with demo data
	$(BIN)/tessera up

.PHONY: test
test: install ## Run the tests on real PostgreSQL and Redis (this machine's, else embedded)
	VENV=$(VENV) bash scripts/run-tests.sh $(PYTEST_ARGS)

.PHONY: test-system
test-system: install ## The system tests: every service as processes, two replicas each, kill -9, a Redis restart, a Redis Cluster failover
	VENV=$(VENV) bash scripts/run-tests.sh -m system tests/system $(PYTEST_ARGS)

.PHONY: fuzz
fuzz: install ## Long fuzz runs: raw bytes against every RPC, arbitrary events through the ingest gate
	TESSERA_FUZZ_EXAMPLES=$${TESSERA_FUZZ_EXAMPLES:-3000} TESSERA_GATE_EXAMPLES=$${TESSERA_GATE_EXAMPLES:-3000} \
	  VENV=$(VENV) bash scripts/run-tests.sh -q tests/integration/test_request_fuzz.py tests/integration/test_ingest_gate.py

.PHONY: lint
lint: install ## ruff, mypy, the layer contracts (.importlinter) and buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/buf lint

.PHONY: chart
chart: install ## Helm chart: lint, render (default and examples/production.yaml) and validate against Kubernetes schemas offline
	bash scripts/fetch-helm.sh >/dev/null
	$(BIN)/pytest -q -p no:cacheprovider tests/deploy/test_chart.py

.PHONY: image-lint
image-lint: install ## Lint the Dockerfile with hadolint, and check the image's user, entrypoint and stages by reading
	$(BIN)/hadolint Dockerfile
	$(BIN)/pytest -q -p no:cacheprovider tests/deploy/test_image.py

.PHONY: proto
proto: install ## Regenerate Python code from protos/
	rm -f tessera/v1/*_pb2*.py tessera/v1/*_pb2*.pyi
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos -I third_party/googleapis \
	  --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. $(PROTOS)

.PHONY: proto-check
proto-check: proto ## Fail if the committed generated code is stale
	@git diff --exit-code --stat -- tessera/ || (echo "generated code is stale: run 'make proto' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain -- tessera/)" || (echo "untracked generated files: run 'make proto' and commit" >&2; git status --porcelain -- tessera/; exit 1)

SCENARIO ?= ingest

.PHONY: bench
BENCH_ARGS ?=
bench: install ## Run a benchmark: SCENARIO=ingest (default), identity, identity-accuracy...; BENCH_ARGS="--dataset all"; see bench/RESULTS.md
	$(BIN)/tessera bench $(SCENARIO) $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .cache
