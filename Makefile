# The two commands of the README. Both create the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The test suite (CPU, Pallas kernels in interpret mode). CI runs exactly this.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# The main job on its embedded default.
demo: $(STAMP)
	$(PY) experiments/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
