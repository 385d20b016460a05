# The two commands of a fresh machine:  make rehearse   and   make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STACK ?= prod

.PHONY: help venv deps test test-fast lint typecheck rehearse rehearse-down plan plan-diff ami-latest bench bench-rehearsal clean

help:
	@echo "make rehearse      boot STACK=$(STACK) as systemd containers booted by cloud-init from the host image,"
	@echo "                   drill every failover (DRILLS=lb,redis for a subset); the reference portal"
	@echo "                   and a real browser (PORTAL=standin: the stdlib stand-in)"
	@echo "                   on Debian 12 hosts (OS=debian-13 or OS=ubuntu-24.04: see docs/rehearsal.md)"
	@echo "make rehearse-down remove whatever a rehearsal left behind"
	@echo "make test          venv + Debian checkers + lint + types + the whole test suite"
	@echo "make plan STACK=x  the offline plan of one stack (build/plan-x.json, .md, .svg)"
	@echo "make plan-diff BASE=ref STACK=x  what the working tree changes against a git ref"
	@echo "make ami-latest    Canonical's current Ubuntu 24.04 AMI ids (needs AWS credentials)"
	@echo "make bench         time the program under mocks and the unit suite"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

deps:
	./tools/install-debian-deps.sh

# The host scripts written in Python have no .py suffix: named so ruff and mypy see them.
PY_HOST_SCRIPTS := $(shell grep -l '^\#!.*python' cloud_init/scripts/hpc-*)

lint: venv
	$(VENV)/bin/ruff check . $(PY_HOST_SCRIPTS)

typecheck: venv
	$(VENV)/bin/mypy __main__.py components cloud_init rehearsal tools offline examples/reference-portal/app/portal
	$(VENV)/bin/mypy policy
	$(VENV)/bin/mypy tests conftest.py
	$(VENV)/bin/mypy --scripts-are-modules $(PY_HOST_SCRIPTS)

test: venv deps lint typecheck
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not daemons"

plan: venv
	$(PY) tools/plan.py --stack $(STACK)

rehearse: venv deps
	$(PY) tools/plan.py --stack $(STACK) --no-diagram
	$(PY) -m rehearsal run --stack $(STACK) $(if $(DRILLS),--drills $(DRILLS)) $(if $(PORTAL),--portal $(PORTAL)) \
		$(if $(OS),--os $(OS))

rehearse-down: venv
	$(PY) -m rehearsal down

BASE ?= HEAD~1
plan-diff: venv
	$(PY) tools/plan_diff.py --base $(BASE) --stack $(STACK)

REGION ?= ap-northeast-2
ami-latest: venv
	$(PY) tools/ami_latest.py --region $(REGION)

bench: venv
	$(PY) tools/bench.py

bench-rehearsal: venv deps
	$(PY) tools/bench_rehearsal.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
