# `make demo`, `make check` and `make test` work on a fresh machine: they create the virtual environment,
# install the package with its pinned dependencies and Debian's Fashion-MNIST; the tests add git (the DVC
# versioning target's tests) and `make test` Chromium (the browser test drives the Prefect UI with it).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
GIT := /usr/bin/git
CHROMIUM := /usr/bin/chromium
POOL ?= dataset-pruning
TEST_WORKERS ?= auto
DEMO_ARGS ?= --dataset fashion-mnist --model cnn --prune-ratio 0.4
DEMO_EVAL_ARGS ?= --dataset fashion-mnist --model cnn --methods influence,random --ratios 0.4 --seeds 0 \
	--gap-samples 2000 --gap-points 5 --out runs

.PHONY: setup demo lint check test bench clean serve deploy options

setup: $(STAMP) $(FMNIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# $(call apt_install,PACKAGE,WHAT): Debian's PACKAGE without its recommended packages, as root; otherwise
# one line saying what is missing and how to install it
define apt_install
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1); \
	else \
	  echo "$(2) is missing: install Debian's package (sudo apt-get install --no-install-recommends $(1))" >&2; exit 1; \
	fi
endef

$(FMNIST):
	$(call apt_install,dataset-fashion-mnist,Fashion-MNIST)

$(GIT):
	$(call apt_install,git,$@)

$(CHROMIUM):
	$(call apt_install,chromium,$@)

demo: setup
	$(BIN)/dataset-prune run $(DEMO_ARGS)
	@# a quick evaluation of that run: full data vs influence vs random at 0.4, one seed, and the
	@# generalization-gap check; `dataset-prune evaluate` without these flags runs the whole matrix
	$(BIN)/dataset-prune evaluate --from-run "$$(ls -td runs/2*/ | head -1)" $(DEMO_EVAL_ARGS)

# pyflakes, pycodestyle, import order, bugbear and pyupgrade, as configured in pyproject.toml
lint: setup
	$(BIN)/ruff check .

# the unit tier: every test not marked `integration` (no Prefect server, Dask cluster, browser or object
# store; tiny data), in TEST_WORKERS processes as below
check: setup $(GIT) lint
	$(BIN)/python -m pytest -m "not integration" -n $(TEST_WORKERS) --maxprocesses 4

# the whole suite (what CI runs), in TEST_WORKERS processes (pytest-xdist; `auto`: one per core, at most 4;
# TEST_WORKERS=0: one process), each with one warm Dask cluster for its in-process runs: times in
# benchmarks/results/test-suite.md
test: setup $(GIT) $(CHROMIUM) lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4

# rewrites the option tables of docs/reference.md from the parser (a test fails while they differ)
options: setup
	$(BIN)/python -c "from flows.cli import write_options_reference; write_options_reference('docs/reference.md')"

# the embedded default: a local Prefect server (SQLite) on 127.0.0.1:4200 serving the deployments of
# deployments/prefect.yaml; with PREFECT_API_URL set, serves onto that server instead
serve: setup
	$(BIN)/python deployments/serve.py $(SERVE_ARGS)

# `prefect deploy --all` onto the server at PREFECT_API_URL, for a process worker:
# $(BIN)/prefect worker start --pool $(POOL)
deploy: setup
	$(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || $(BIN)/prefect work-pool create $(POOL) --type process
	cd deployments && $(abspath $(BIN))/prefect --no-prompt deploy --all

# every benchmarks/*.py: influence runs peer_influence in pyDVL's own venv, worker_check imports local_s3
# (tests/test_experiments.py checks the list); the research experiments are in experiments/ (its README)
bench: setup
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.selection
	$(BIN)/python -m benchmarks.selection_reference
	$(BIN)/python -m benchmarks.influence
	$(BIN)/python -m benchmarks.resnet_influence
	$(BIN)/python -m benchmarks.exact_inverse
	$(BIN)/python -m benchmarks.worker_check
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf runs datasets .pytest_cache
