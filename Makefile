# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Each builds its own virtual environment in .venv; torch==2.13.0 is installed first so that
# the package's torch range is met by the CPU build instead of a multi-GB CUDA download.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit package-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev,examples,docs]"
	# nilearn only carries the MNI template files for the example trainer; its heavy
	# dependencies (scikit-learn, pandas, ...) are not needed to read them.
	$(BIN)/python -m pip install -q --no-deps "nilearn>=0.10"
	touch $(STAMP)

# The default comparison at the demonstration budget (5 methods x 2 seeds x 200 iterations on
# 2 CPU cores, resumable); `$(BIN)/python -m examples.bual_demo --full` runs the full budget.
demo: $(STAMP)
	$(BIN)/python -m examples.bual_demo $(DEMO_ARGS)

test: $(STAMP) lint typecheck unit package-check

lint: $(STAMP)
	$(BIN)/ruff check bual_losses tests examples benchmarks
	$(BIN)/ruff format --check bual_losses

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

# Proves "pip-installable" on every run: build sdist + wheel, install the wheel into a fresh
# environment that has nothing but torch, and import the public API there.
package-check: $(STAMP)
	rm -rf dist $(VENV)-wheel
	$(BIN)/python -m build --no-isolation --sdist --wheel --outdir dist . > /dev/null
	$(PYTHON) -m venv $(VENV)-wheel
	$(VENV)-wheel/bin/python -m pip install -q "$(TORCH_PIN)"
	$(VENV)-wheel/bin/python -m pip install -q dist/*.whl
	cd /tmp && $(CURDIR)/$(VENV)-wheel/bin/python -c "import bual_losses as b; print('wheel import ok:', b.__version__, len(b.__all__), 'public names')"
	rm -rf $(VENV)-wheel

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_losses.py

clean:
	rm -rf $(VENV) $(VENV)-wheel dist build site .pytest_cache .mypy_cache .ruff_cache .hypothesis
