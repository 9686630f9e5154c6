# evav: the commands a user needs, plus lint.
#   make demo    set up, then the whole idea end to end on the CPU in minutes (tools/demo.py):
#                synthetic tasks -> shards -> DeepSpeed training -> per-task evaluation
#                (DEMO_ARGS="--size tiny" for a one-minute check, "--fresh" for a new run)
#   make setup   create .venv (torch CPU wheel when no torch is present) and install evav
#   make test    run the test suite (real data from ../shared/datasets when present)
PY ?= .venv/bin/python
DEMO_ARGS ?=

.PHONY: demo setup test lint
demo: setup
	$(PY) tools/demo.py $(DEMO_ARGS)

setup:
	./setup.sh

test:
	$(PY) -m pytest -q tests

lint:
	$(PY) -m ruff check evav preprocessing tools tests
	$(PY) -m ruff format --check evav preprocessing tools tests
