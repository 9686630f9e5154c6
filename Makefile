# evav: the two commands a user needs, plus lint.
#   make setup   create .venv (torch CPU wheel when no torch is present) and install evav
#   make test    run the test suite (real data from ../shared/datasets when present)
PY ?= .venv/bin/python

.PHONY: setup test lint
setup:
	./setup.sh

test:
	$(PY) -m pytest -q tests

lint:
	$(PY) -m ruff check evav preprocessing tools tests
	$(PY) -m ruff format --check evav preprocessing tools tests
