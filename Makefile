# Two commands set everything up on a fresh machine (each creates .venv if needed):
#   make demo   run the example project's pipeline, step by step, through kvx-runtime
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvx-installed

.PHONY: demo test test-fast test-image image lint bench bench-quick clean

$(STAMP): pyproject.toml integration/example_project/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip uv
	$(VENV)/bin/uv pip install --python $(PY) --quiet -e ".[dev]" \
		-r integration/example_project/requirements.txt
	# Write bytecode now: with PYTHONDONTWRITEBYTECODE set (as on our CI machines) every step
	# process would otherwise recompile Kedro, MLflow and pandas from source (~8 s each).
	$(PY) -m compileall -q -j 0 $(VENV)/lib kvx_runtime integration/example_project/src > /dev/null || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) integration/demo.py

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest tests

# Builds the base and example project images with buildah (needs root, buildah, debootstrap).
test-image: $(STAMP)
	$(PY) -m pytest -m buildah integration/test_image.py

# The base image from this checkout (needs buildah or docker and a registry-reachable base).
image: $(STAMP)
	rm -f docker/wheels/*.whl
	$(PY) -m pip wheel -q --no-deps -w docker/wheels .
	buildah bud -f docker/Dockerfile -t kvx-runtime:0.1.0 . || docker build -f docker/Dockerfile -t kvx-runtime:0.1.0 .

lint: $(STAMP)
	$(VENV)/bin/ruff check kvx_runtime tests integration bench

# Benchmarks: bench/results/latest.json and docs/benchmarks.md (full: about ten minutes).
bench: $(STAMP)
	$(PY) bench/run.py

bench-quick: $(STAMP)
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache integration/example_project/.kvx
