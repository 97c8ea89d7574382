# klvae: `make demo` trains and reports on the committed photos, `make test` runs the notebooks and the fast tests,
# `make test-all` every test (CI). KLVAE_CPU_BF16=1 or =0 forces the bf16 probe for any of them.
# Each target creates .venv from pyproject.toml when it is missing or older than pyproject.toml.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.klvae-installed
# torch is pinned to the build these machines install from local files; CUDA machines take the same wheel.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: venv test test-all sync nbtest nbtest-all pytest pytest-all demo reports reports-check outputs lab bench readme clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 > /dev/null
	touch $@

# notebooks must be clean and klvae/ exactly what they export: both checked without relying on git state
sync: venv
	@tmp=$$(mktemp -d); cp -r nbs klvae $$tmp/; \
	$(BIN)/nbdev-clean && $(BIN)/nbdev-export; \
	if ! diff -r -q -x __pycache__ -x .ipynb_checkpoints $$tmp/nbs nbs || ! diff -r -q -x __pycache__ $$tmp/klvae klvae; then \
	  echo "FAIL: nbdev-clean or nbdev-export changed the files above: notebooks and klvae/ are out of sync. Review the diff and commit it."; exit 1; fi; \
	echo "notebooks clean, klvae/ in sync"

# every notebook under nbdev-test; the Table 8 and hinge companions train their ci-scale studies there (KLVAE_RERUN=1: a stale
# ci cache is retrained, not an error), 3.5 of the 7 minutes `make test` took, so only `make test-all` (CI) runs them;
# `make reports-check` (CI too) executes them on the committed results
COMPANIONS_TRAINING := ^1[01]_
nbtest: venv
	KLVAE_RERUN=1 $(BIN)/nbdev-test --n-workers 2 --timing --skip-file-re '$(COMPANIONS_TRAINING)'

nbtest-all: venv
	KLVAE_RERUN=1 $(BIN)/nbdev-test --n-workers 2 --timing

# the fast tests; `slow` marks those that start many processes, a browser or long trainings (all run in test-all and CI)
pytest: venv
	$(BIN)/pytest tests -q -ra -m "not slow"

pytest-all: venv
	$(BIN)/pytest tests -q -ra

test: sync nbtest pytest

test-all: sync nbtest-all pytest-all

# the main job: train the `cpu` preset for its time budget on the committed photos, measure the 24 held-out photos beside
# the baselines, write reports/demo.html
demo: venv
	$(BIN)/python -m klvae.demo

# the companion notebooks executed at SCALE (report: the committed pages; ci: minutes), the library notebooks, the demo's
# page and an index, as offline HTML pages in OUT (klvae.report). The studies' results come from their cache
# (reports/studies/NAME/SCALE, committed for `report`) when its digest matches their configs and evaluation code; a stale
# study stops the build with the command that retrains it, unless RERUN=1 asks for the retraining (`klvae-study NAME` too)
SCALE ?= report
OUT   ?= reports
RERUN ?=
reports: venv
	KLVAE_RERUN=$(RERUN) $(BIN)/python -m klvae.report --scale $(SCALE) --out $(OUT)

# rebuild every page from the committed results in a temporary folder (nothing trains) and compare with reports/
reports-check: venv
	$(BIN)/python -m klvae.report --check

# the library notebooks' saved outputs (what JupyterLab opens with and the docs pages show, "outputs as committed"), made again
# from the current code as a user runs them (not under tests; 05_metrics computes rFID): after a change that alters what a cell
# prints, run this and commit the notebooks. The companion notebooks are executed by `make reports` instead.
DOC_NBS = $(filter-out nbs/10_% nbs/11_% nbs/12_%,$(wildcard nbs/*.ipynb))
outputs: venv
	env -u IN_TEST -u KLVAE_RERUN -u KLVAE_SCALE $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1200 $(DOC_NBS)
	$(BIN)/python -c "import nbformat, sys; [nbformat.write(nb, p) for p in sys.argv[1:] if (nb := nbformat.read(p, 4)).metadata.pop('widgets', None)]" $(DOC_NBS)  # widget state: MBs, not source
	$(BIN)/nbdev-clean

lab: venv
	$(BIN)/jupyter lab --notebook-dir=nbs

bench: venv
	$(BIN)/python bench/bench_preset.py
	$(BIN)/python bench/bench_model.py
	$(BIN)/python bench/bench_train.py

# README.md is generated from nbs/index.ipynb (Quarto is not available; nbconvert renders the markdown)
readme: venv
	$(BIN)/jupyter nbconvert --to markdown --log-level WARN nbs/index.ipynb --output-dir . --output README \
	  --RegexRemovePreprocessor.enabled=True --RegexRemovePreprocessor.patterns="['^#\\| ?(hide|default_exp|export)']"

clean:
	rm -rf $(VENV) _proc _docs
