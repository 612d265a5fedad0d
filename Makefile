# Two commands set everything up on a fresh machine (each creates .venv if needed):
#   make demo   run the example project's pipeline, step by step, through kvx-runtime
#   make test   run the test suite (CI also runs test-faults, test-kedro-oldest and test-image)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvx-installed

# The oldest Kedro we support; `make test-kedro-oldest` runs what depends on Kedro against it.
KEDRO_OLDEST ?= kedro~=1.0.0
OLDEST_VENV ?= .venv-kedro-oldest
# Airflow 3 and the Kubernetes provider, in a virtualenv of their own (the tests marked
# `airflow` parse and run the compiled DAGs with its python; integration/airflow_env.py), and
# Airflow 2.10 (Cloud Composer 2) in another, which parses the same DAG files.
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW2_VENV ?= .venv-airflow2
# pytest-xdist workers: one per core; tests sharing one heavy server (xdist_group) run on one worker.
TEST_WORKERS ?= auto
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup
# The fault suite waits more than it computes (retry back-off, slowed requests): two workers per core.
FAULT_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) * 2 )))

.PHONY: demo test test-fast test-faults test-kedro-oldest test-image test-airflow airflow-venv image lint bench bench-quick bench-image clean

# $(1): the virtualenv, $(2): extra requirements (a Kedro pin).
define make_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip uv
	$(1)/bin/uv pip install --python $(1)/bin/python --quiet -e ".[dev]" \
		-r integration/example_project/requirements.txt $(2)
	# Write bytecode now: with PYTHONDONTWRITEBYTECODE set (as on our CI machines) every step
	# process would otherwise recompile Kedro, MLflow and pandas from source (~8 s each).
	$(1)/bin/python -m compileall -q -j 0 $(1)/lib kvx_runtime integration/example_project/src \
		integration/real_world_project/src > /dev/null || true
	$(1)/bin/python -c "import kedro; print('Kedro', kedro.__version__, 'in $(1)')"
	touch $(1)/.kvx-installed
endef

$(STAMP): pyproject.toml integration/example_project/requirements.txt
	$(call make_venv,$(VENV),)

$(OLDEST_VENV)/.kvx-installed: pyproject.toml integration/example_project/requirements.txt Makefile
	$(call make_venv,$(OLDEST_VENV),"$(KEDRO_OLDEST)")

demo: $(STAMP)
	$(PY) integration/demo.py

# The slowest tests are listed at the end: CI's time budget is planned from them.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_PARALLEL) --durations=20

# The fast tests: tests/ without the slow ones (the 2,000-case config fuzz, the random-pipeline
# property test), which make test and CI run.
test-fast: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_PARALLEL) -m "not slow and not buildah and not faults"

# The fault-injection suite (integration/test_faults.py): steps through seeded 429s, 503s,
# resets and lost answers, and stop signals mid-write. Most of its time is retry back-off.
test-faults: $(STAMP)
	$(PY) -m pytest -n $(FAULT_WORKERS) -m faults integration/test_faults.py

# The tests marked `kedro` on the oldest supported Kedro: each path whose behaviour depends on
# Kedro's version once (sessions and the runner, pipeline loading, catalog and config loader,
# dataset factories, save versions, kedro-mlflow's hooks, Kedro's CLI), not every end-to-end
# variation again; make test runs them all on the newest.
test-kedro-oldest: $(OLDEST_VENV)/.kvx-installed
	$(OLDEST_VENV)/bin/python -m pytest $(PYTEST_PARALLEL) -m kedro

# Airflow's own virtualenvs, Airflow 3's and 2.10's (about 10 s each with uv's cache warm; 2.10's
# 10 to 40 s cold, mostly downloads); the airflow tests build them on demand too.
airflow-venv: $(STAMP)
	KVX_TEST_AIRFLOW_VENV=$(AIRFLOW_VENV) KVX_TEST_AIRFLOW2_VENV=$(AIRFLOW2_VENV) $(PY) -m integration.airflow_env

# The compiled DAGs parsed and their pods built by real Airflow 3 and 2.10 (make test runs them too).
test-airflow: airflow-venv
	$(PY) -m pytest $(PYTEST_PARALLEL) -m airflow

# Builds the base and example project images with buildah (needs root, buildah, debootstrap).
test-image: $(STAMP)
	$(PY) -m pytest -m buildah integration/test_image.py

# The base image from this checkout (needs buildah or docker and a registry-reachable base).
# KVX_MLFLOW=skinny (default), full or none; tags: kvx-runtime:0.1.0, 0.1.0-mlflow-full, 0.1.0-no-mlflow.
KVX_MLFLOW ?= skinny
IMAGE_TAG := kvx-runtime:0.1.0$(if $(filter full,$(KVX_MLFLOW)),-mlflow-full)$(if $(filter none,$(KVX_MLFLOW)),-no-mlflow)
image: $(STAMP)
	rm -f docker/wheels/*.whl
	$(PY) -m pip wheel -q --no-deps -w docker/wheels .
	buildah bud -f docker/Dockerfile --build-arg KVX_MLFLOW=$(KVX_MLFLOW) -t $(IMAGE_TAG) . \
		|| docker build -f docker/Dockerfile --build-arg KVX_MLFLOW=$(KVX_MLFLOW) -t $(IMAGE_TAG) .

lint: $(STAMP)
	$(VENV)/bin/ruff check kvx_runtime tests integration bench
	$(VENV)/bin/python -m mypy

# Benchmarks: bench/results/latest.json, docs/benchmarks.md and the figures in docs/reliability.md
# (full: about twenty minutes; quick: about five).
bench: $(STAMP)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

# Image sizes (the base image's slim and full-mlflow flavours: only here, not in test-image) and
# project image rebuilds after a code change, against code upload (real buildah builds: needs
# root, buildah, debootstrap and a package index; about fifteen minutes).
bench-image: $(STAMP)
	$(PY) bench/run.py --only image,code

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(AIRFLOW_VENV) $(AIRFLOW2_VENV) .pytest_cache integration/example_project/.kvx
