# One venv, hashed lock files, three commands: test, demo, bench. `make lock` after editing
# requirements*.txt resolves them into requirements.lock (the image's: no embedded PostgreSQL)
# and requirements-dev.lock (the venv's), every transitive package pinned and hashed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Python 3.11 on any platform (--universal keeps the markers), hashes of every file of a
# version, and the versions already in the lock kept unless an input asks for others.
COMPILE = $(PY) -m uv pip compile --quiet --generate-hashes --universal --python-version 3.11 \
	--custom-compile-command "make lock"

.PHONY: test demo bench lint lock clean

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m loader.demo

bench: $(STAMP)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/query.py

lint: $(STAMP)
	$(PY) -m ruff check .

# Needs PyPI. uv comes from requirements-dev.txt's pin (installed here if the venv lacks it).
# The image's lock is constrained by the venv's, so both hold the same versions.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m uv --version >/dev/null 2>&1 || \
		$(PY) -m pip install --quiet "$$(grep -oE '^uv==[^ #]+' requirements-dev.txt)"
	$(COMPILE) requirements-dev.txt -o requirements-dev.lock
	$(COMPILE) --constraint requirements-dev.lock requirements.txt -o requirements.lock

clean:
	rm -rf $(VENV) .data .pytest_cache
