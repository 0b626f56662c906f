# The two commands of the README: `make run` (the pipeline on the default config) and `make test`.
# Both create the Python environment (.venv) on first use.
VENV := .venv
PYTHON := $(VENV)/bin/python
CORES ?= 4
SNAKEMAKE := PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake

.PHONY: help run smoke test test-fast lint report clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/installed  ## run the pipeline on the default config (results/report.md)
	$(SNAKEMAKE) --cores $(CORES)

smoke: $(VENV)/installed  ## the whole DAG on the tiny smoke experiment
	$(SNAKEMAKE) --cores $(CORES) --configfile config/experiments/smoke.yaml

report: $(VENV)/installed  ## Snakemake's HTML report of the last run
	$(SNAKEMAKE) --cores 1 --report results/report.html

test: $(VENV)/installed  ## every test: unit, smoke training, whole DAGs
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PYTHON) -m pytest -v -rs --durations=10

test-fast: $(VENV)/installed  ## unit and smoke-training tests only
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PYTHON) -m pytest -q -m "not workflow"

lint: $(VENV)/installed  ## snakemake --lint
	$(SNAKEMAKE) --lint

clean:  ## remove results and Snakemake's state (keeps .venv)
	rm -rf results .snakemake
