# The two commands of the README: `make run` (the pipeline on the default config) and `make test`.
# Both create the Python environment (.venv) on first use.
VENV := .venv
PYTHON := $(VENV)/bin/python
CORES ?= 4
# Rules call `python -m ssl_pipeline ...`: the environment's python must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
SNAKEMAKE := $(VENV)/bin/snakemake

# EXPERIMENT=smoke selects config/experiments/smoke.yaml on top of config/config.yaml.
EXPERIMENT ?=
CONFIG_ARGS := $(if $(EXPERIMENT),--configfile config/experiments/$(EXPERIMENT).yaml)
VERSIONING := $(PYTHON) -m ssl_pipeline.tools.versioning

.PHONY: help run reproduce smoke smoke-slurm test test-fast lint report clean dvc-yaml record push pull bench bench-preprocess bench-tiny bench-residency bench-nodes \
	time-to-accuracy race gpu-check gpu-bundle gpu-rehearsal docs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-17s %s\n", $$1, $$2}'

$(VENV)/installed: requirements.txt requirements-benchmark.txt requirements-docs.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

run: $(VENV)/installed  ## run the pipeline on the default config (results/report.md)
	$(SNAKEMAKE) --cores $(CORES) $(CONFIG_ARGS)

reproduce: $(VENV)/installed  ## SimCLR's claims with statistics (results/claims.csv; docs/sweeps-and-claims.md)
	$(SNAKEMAKE) --cores $(CORES) --configfile config/experiments/reproduce-simclr.yaml

smoke: $(VENV)/installed  ## the whole DAG on the tiny smoke experiment
	$(SNAKEMAKE) --cores $(CORES) --configfile config/experiments/smoke.yaml

smoke-slurm: $(VENV)/installed  ## the smoke DAG as Slurm jobs (a test cluster on this machine: sudo .ci/start-slurm [--nodes 2])
	$(SNAKEMAKE) --workflow-profile profiles/slurm --max-threads 2 --configfile config/experiments/smoke.yaml

report: $(VENV)/installed  ## Snakemake's HTML report of the last run
	$(SNAKEMAKE) --cores 1 $(CONFIG_ARGS) --report results/report.html

test: $(VENV)/installed  ## every test: unit, smoke training, whole DAGs
	$(PYTHON) -m pytest -v -rs --durations=10

test-fast: $(VENV)/installed  ## unit and smoke-training tests only
	$(PYTHON) -m pytest -q -m "not workflow"

lint: $(VENV)/installed  ## snakemake --lint, and snakefmt --check of the Snakefile and every .smk
	$(SNAKEMAKE) --lint
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules/*.smk

dvc-yaml: $(VENV)/installed  ## write dvc.yaml from the Snakemake DAG (of EXPERIMENT, if set)
	$(VERSIONING) dvc-yaml $(CONFIG_ARGS)

record: $(VENV)/installed  ## dvc commit the outputs of a finished Snakemake run into dvc.lock
	$(VERSIONING) record

push: $(VENV)/installed  ## dvc push outputs to the DVC remote
	$(VERSIONING) push

pull: $(VENV)/installed  ## dvc pull outputs, then make Snakemake see them as up to date
	$(VERSIONING) pull

bench: $(VENV)/installed  ## training speed: ours against the PIL + DataLoader recipe and lightly's (about 7 min on 2 CPUs)
	$(PYTHON) -m ssl_pipeline.benchmark speed --out results/performance/speed.json

bench-preprocess: $(VENV)/installed  ## preprocessing images/s: one job against shard jobs on 22,000 synthetic JPEGs (about 2 min on 2 CPUs)
	$(PYTHON) -m ssl_pipeline.tools.preprocess_benchmark --cores 2 --out results/performance/preprocess.json

bench-tiny: $(VENV)/installed  ## the speed benchmark (lightly rows too) on 512 images, in about 25 s
	$(PYTHON) -m ssl_pipeline.benchmark speed --tiny --out results/performance/speed-tiny.json

time-to-accuracy: $(VENV)/installed  ## supervised training until test accuracy reaches 0.90, then 0.92
	$(PYTHON) -m ssl_pipeline.benchmark time-to-accuracy --epochs 12 --time-limit 600 \
		--out results/performance/time_to_accuracy.json

bench-residency: $(VENV)/installed  ## pretraining images/s with the images on the device, host and disk, warm and cold cache (about 13 min on 2 CPUs)
	$(PYTHON) -m ssl_pipeline.benchmark residency --out results/performance/residency.json

bench-nodes: $(VENV)/installed  ## smoke pretraining on 2 Slurm nodes against 1 node x 2 processes (needs sudo .ci/start-slurm --nodes 2; about 3 min)
	$(PYTHON) -m ssl_pipeline.tools.nodes_benchmark --out results/performance/nodes.json

race: $(VENV)/installed  ## SimCLR pretraining, ours against lightly: kNN accuracy per epoch, time to a target (about 15 min on 2 CPUs)
	$(PYTHON) -m ssl_pipeline.benchmark race --out results/performance/race.json

gpu-check: $(VENV)/installed  ## prove the CUDA path on an NVIDIA GPU: time to 0.92, benchmark, smoke DAG, gpu tests
	$(PYTHON) -m ssl_pipeline.tools.gpu_check

gpu-bundle: $(VENV)/installed  ## what an offline GPU node lacks (wheels, data, manifest) for gpu-bundle/run there
	$(PYTHON) -m ssl_pipeline.tools.gpu_bundle --out gpu-bundle

gpu-rehearsal: gpu-bundle  ## gpu-bundle/run here as on the node: Python 3.12, no venv, git, network or data package
	.ci/gpu-rehearsal

# The site from docs/ (mkdocs.yml), after checking that docs/configuration.md matches the config schema.
# NO_MKDOCS_2_WARNING silences mkdocs-material's end-of-life banner, which is not a warning about the docs.
docs: $(VENV)/installed  ## build the documentation site (mkdocs, results/site)
	$(PYTHON) -m ssl_pipeline.tools.config_reference --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir results/site

clean:  ## remove results and Snakemake's state (keeps .venv)
	rm -rf results .snakemake
