# The two commands of the README: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_USE_LEGACY_KERAS := 1
# Tests keep TensorFlow's C++ errors; the demo runs at 3 (the CLI's default) to hide its load-time CUDA noise.
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONWARNINGS := ignore::FutureWarning,ignore::DeprecationWarning

.PHONY: demo ui test test-fast lint bench constraints constraints-airflow clean

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=/path/to/python3.11 ...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py requirements.txt constraints.txt
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt setuptools wheel
	$(PY) -m pip install --quiet -c constraints.txt -r requirements.txt
	@touch $(STAMP)

# Airflow for the export tests, in a venv of its own: its pins (SQLAlchemy 1.4, Flask 2.2...) are not ours.
# Best effort: if it cannot be installed, the suite still runs and the Airflow tests say what is missing
# (and fail under CI=true).
AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.installed

$(AIRFLOW_STAMP): constraints-airflow.txt
	@{ $(PYTHON) -m venv $(AIRFLOW_VENV) \
	  && $(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24" \
	  && $(AIRFLOW_VENV)/bin/python -m pip install --quiet -c constraints-airflow.txt apache-airflow \
	  && touch $@; } || echo "could not install Airflow into $(AIRFLOW_VENV); its tests will fail or skip"

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=3 $(VENV)/bin/beam-pipeline run examples/chicago_taxi/pipeline.py --pipeline-root pipelines/chicago_taxi

# The metadata UI over the demo's runs: http://127.0.0.1:8080/
ui: $(STAMP)
	$(VENV)/bin/beam-pipeline ui --pipeline-root pipelines/chicago_taxi

# Two workers (pytest-xdist), each test file whole on one of them, so its module fixtures are built
# once (--dist loadgroup with a group per file handed the tests out one by one here, building every
# module fixture on both workers); TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) $(AIRFLOW_STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/example_stats.py

# Re-pin after changing requirements: the whole verified set, setuptools included (TensorBoard 2.16
# needs pkg_resources, which setuptools >= 81 no longer ships).
constraints: $(PY)
	$(PY) -m pip freeze --all --exclude-editable | grep -v -e '^pip==' -e '^beam-pipeline' > constraints.txt

constraints-airflow:
	rm -rf $(AIRFLOW_VENV) && $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet --upgrade "pip>=24"
	$(AIRFLOW_VENV)/bin/python -m pip install --quiet "apache-airflow==2.10.5"
	$(AIRFLOW_VENV)/bin/python -m pip freeze --all | grep -v '^pip==' > constraints-airflow.txt
	@touch $(AIRFLOW_STAMP)

clean:
	rm -rf pipelines .pytest_cache
