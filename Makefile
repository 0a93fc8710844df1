# The two commands of the README:
#   make demo   set up .venv (when needed) and run the workflow on the bundled demo scenes
#   make test   set up .venv (when needed) and run the test suite's fast tier (what proves the software works)
#   make test-all   every test: the slow tier, end-to-end workflow runs and SLURM (what CI runs)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.roadxfer-installed
CORES ?= $(shell nproc)

.PHONY: demo test test-all lint dryrun bench clean-demo pretrain

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --workflow-profile profiles/local --configfile config/demo.yaml --cores $(CORES)
	@echo "Demo finished. Report: $(CURDIR)/results/report/report.html (outputs under results/, logs/ and benchmarks/ mirror them)"

# Re-make the shipped pretrained model (about 28 min on 2 AMX cores in bfloat16): 48 generated scenes,
# then a float16 copy to share under resources/pretrained/ (docs/models.md, "The shipped pretrained model").
PRETRAINED := resources/pretrained/paved-linknet-lite0
pretrain: $(STAMP)
	$(BIN)/snakemake --workflow-profile profiles/local --configfile experiments/pretrain.yaml --cores $(CORES)
	$(BIN)/python -m roadxfer share results/models/base $(PRETRAINED)
	sha256sum $(PRETRAINED)/$(notdir $(PRETRAINED)).pth

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not workflow and not slurm"

test-all: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/snakemake --lint

dryrun: $(STAMP)
	$(BIN)/snakemake --dry-run --quiet

bench: $(STAMP)
	$(BIN)/python bench/bench_tiles.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_classify.py

clean-demo:
	rm -rf results logs benchmarks resources/demo
